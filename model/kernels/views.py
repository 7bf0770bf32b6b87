"""Split views for CPU inference: a stacked axis held as separate buffers (`Parts`).

XLA:CPU copies any part of an array that a matmul reads before the matmul runs: a layer's weights
sliced out of the scanned stack of blocks, or the selected experts gathered by index. Each weight
is then read, written and read again. So on one CPU device inference reads views instead: every
block's weights (for the "experts" layout, every expert's too) a buffer of its own, aliasing the
stored arrays (jax.device_put takes aligned host memory as it lies: nothing is copied).

The views keep the parameter tree's names and shapes: a leaf [nb, ...] under "blocks" becomes
`Parts` of nb buffers [...], an expert weight [nb, E, ...] Parts of nb Parts of E; a quantized
leaf (a qwix QArray) stays a QArray, its qvalue and scale split alike. The KV cache of
the split layouts likewise holds Parts of nb buffers per leaf, so that each block updates buffers
of its own in place. What reading in place gains: `python -m experiments.bench_layouts`.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .experts import EXPERT_WEIGHTS


@jax.tree_util.register_pytree_node_class
class Parts:
    """An array [n, ...] held as n buffers [...]; `parts[i]` is a buffer, never a slice."""

    def __init__(self, parts: Sequence):
        self.parts = tuple(parts)

    def tree_flatten(self):
        return self.parts, None

    @classmethod
    def tree_unflatten(cls, _, parts):
        return cls(parts)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self):
        return self.parts[0].dtype

    def __getitem__(self, i: int):
        return self.parts[i]

    def __len__(self) -> int:
        return len(self.parts)

    def astype(self, dtype) -> "Parts":
        return Parts([p.astype(dtype) for p in self.parts])


def is_parts(x) -> bool:
    return isinstance(x, Parts)


def split_params(params, layout: str):
    """`params` (as stored) read as `layout` ("blocks" or "experts"): every leaf under "blocks"
    held by block, and with "experts" each MoE layer's expert weights by expert too. Leaves
    outside the decoder's blocks (embeddings, head, vision tower) stay as they are."""
    if layout not in ("blocks", "experts"):
        raise ValueError(f"unknown split layout {layout!r}: 'blocks' or 'experts'")
    arrays, index = [], []  # every view to take: a[index] for a in arrays

    def view(a, i) -> int:  # the number of the view a[i], taken below all at once
        arrays.append(a), index.append(i)
        return len(arrays) - 1

    def walk(tree, path):
        out = {}
        for name, a in tree.items():
            if isinstance(a, dict):
                out[name] = walk(a, path + (name,))
            elif layout == "experts" and path[-1:] == ("moe",) and name in EXPERT_WEIGHTS:
                # an MoE layer's routed experts (not its shared expert): [nb, E, ...]
                out[name] = jax.tree.map(lambda c: Parts([Parts([view(c, (i, e)) for e in
                                                                 range(c.shape[1])])
                                                          for i in range(c.shape[0])]), a)
            else:  # (tree.map: a QArray's qvalue and scale alike)
                out[name] = jax.tree.map(lambda c: Parts([view(c, i) for i in range(c.shape[0])]),
                                         a)
        return out

    numbered = walk(params["blocks"], ())
    views = _views(arrays, index)
    return {**params, "blocks": jax.tree.map(lambda k: views[k], numbered)}


def _views(arrays, index):
    """[a[i] for a, i in zip(arrays, index)], each an array of its own. On the CPU they alias the
    arrays' memory (jax.device_put takes aligned host memory as it is): nothing is copied."""
    if all(_on_host(a) for a in arrays):
        return jax.device_put([np.asarray(a)[i] for a, i in zip(arrays, index)])
    return [a[i] for a, i in zip(arrays, index)]


def _on_host(a) -> bool:
    return not isinstance(a, jax.Array) or all(d.platform == "cpu" for d in a.devices())


def split(tree):
    """A tree of stacked [n, ...] arrays (e.g. the KV cache) held as Parts of n buffers each
    (copied once); a tree that is split already is returned as it is."""
    return jax.tree.map(lambda a: a if is_parts(a) else Parts([a[i] for i in range(a.shape[0])]),
                        tree, is_leaf=is_parts)


def stack(tree):
    """The inverse of `split`: every Parts leaf stacked back into one array [n, ...]."""
    return jax.tree.map(lambda a: jnp.stack([stack(p) for p in a.parts]) if is_parts(a) else a,
                        tree, is_leaf=is_parts)


def part(tree, i: int):
    """Block i's tree: each Parts leaf replaced by its i-th buffer."""
    return jax.tree.map(lambda a: a[i], tree, is_leaf=is_parts)


def join(trees):
    """Per-block trees of one structure -> one tree of Parts leaves (the inverse of `part`)."""
    return jax.tree.map(lambda *parts: Parts(parts), *trees, is_leaf=is_parts)
