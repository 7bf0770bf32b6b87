"""Split layouts for CPU inference: each block's, and each expert's, weights an array of their own.

XLA:CPU copies any part of an array that a matmul reads before the matmul runs: a layer's weights
sliced out of the scanned stack of blocks, or the selected experts gathered by index. Each weight
is then read, written and read again; profiles of the benchmark model (D=256, 8 layers, 16
experts) put the copies at about a third of a prefill and half of a decode step. The copies run
on both cores and the small matmuls that follow them on one, so reading in place gains less than
that: prefill of 4 x 128 tokens 91 ms against 124 ms stacked, a decode step 5.9 ms against 7.0
(`python -m experiments.bench_layouts`, 2-core machine).

The layouts (`Decoder.layout`):
- "stacked": as stored; the blocks are scanned (accelerators, meshes, training).
- "blocks": each block's parameters are arrays of their own ("block_{i}"), and the blocks run
  one after another. Prefill on CPU: the grouped MoE reads each block's experts where they lie.
- "experts": as "blocks", and each expert's weights are arrays of their own ("{name}_{e}").
  Decoding on CPU: each token copy switches to its expert (`moe.experts_switched`), whose
  matmuls read only the selected experts, once.
On the CPU the split arrays are views of the stacked ones: nothing is copied.
"""
from __future__ import annotations

import jax
import numpy as np

from .config import Config
from .moe import EXPERT_WEIGHTS


# An unrolled program compiles in time about proportional to its size, where the scan's stays
# flat: the split layouts are taken for up to MAX_BLOCKS blocks, and "experts" for up to
# MAX_BRANCHES switch branches (MoE layers x experts; "blocks" beyond). Measured on the 2-core
# machine, decoding with 16 experts: 2 blocks compile in 5 s by experts (2 s scanned); 12
# blocks in 31 s by experts, 11 s by blocks.
MAX_BLOCKS = 4
MAX_BRANCHES = 256


def for_inference(cfg: Config, params, plan, layout: str):
    """(layout, params laid out so) for an inference run that asks for `layout`: on one CPU
    device and within the budgets above, that layout (the cache is then split by blocks);
    otherwise ("stacked", params as they are): the split layouts answer XLA:CPU's copies, and
    the sharding rules of a mesh name the stacked axes."""
    t = cfg.text
    if plan is not None or jax.default_backend() != "cpu" or t.num_blocks > MAX_BLOCKS:
        return "stacked", params
    if layout == "experts" and len(t.moe_layers) * t.num_experts > MAX_BRANCHES:
        layout = "blocks"
    return layout, split_params(cfg, params, layout)


def split_params(cfg: Config, params, layout: str):
    """`params` (stacked, as stored) in `layout`, "blocks" or "experts" (see above): "blocks"
    becomes "block_0" ... "block_{nb-1}", and with "experts" an expert weight "w" [E, ...] under
    each MoE layer becomes "w_0" ... "w_{E-1}". The vision tower's parameters stay as they are."""
    if layout not in ("blocks", "experts"):
        raise ValueError(f"unknown split layout {layout!r}: 'blocks' or 'experts'")
    leaves, index = [], []

    def walk(tree, i, path):  # mirrors tree for block i, noting where each leaf's view goes
        out = {}
        for name, sub in tree.items():
            if isinstance(sub, dict):
                out[name] = walk(sub, i, path + (name,))
            elif layout == "experts" and path[-1:] == ("moe",) and name in EXPERT_WEIGHTS:
                for e in range(cfg.text.num_experts):
                    out[f"{name}_{e}"] = len(leaves)
                    leaves.append(sub), index.append((i, e))
            else:
                out[name] = len(leaves)
                leaves.append(sub), index.append(i)
        return out

    blocks = {f"block_{i}": walk(params["blocks"], i, ()) for i in range(cfg.text.num_blocks)}
    views = _views(leaves, index)
    split = jax.tree.map(lambda k: views[k], blocks)
    return {**{k: v for k, v in params.items() if k != "blocks"}, **split}


def _views(arrays, index):
    """[a[i] for a, i in zip(arrays, index)], each an array of its own. On the CPU they alias the
    arrays' memory (jax.device_put takes aligned host memory as it is): nothing is copied."""
    if all(_on_host(a) for a in arrays):
        return jax.device_put([np.asarray(a)[i] for a, i in zip(arrays, index)])
    return [a[i] for a, i in zip(arrays, index)]


def _on_host(a) -> bool:
    return not isinstance(a, jax.Array) or all(d.platform == "cpu" for d in a.devices())
