"""The HF <-> params key table: one row per kind of HF tensor, read in both directions.

A row names the HF tensor (relative to its model or layer prefix), the leaf or leaves of our
tree it becomes, and a named transform with its inverse. `hf_keys(cfg, layout)` expands the
rows into one `Key` per HF tensor of a concrete checkpoint; `check` holds a checkpoint against
what its config implies; `ours_slabs` / `hf_slabs` move data a slab at a time in either direction.

Decoder layer i lives at blocks/layer_{i % period}[i // period]: the decoder scans over blocks,
so every leaf under "blocks" (and under "vision/layers") has a leading stacked axis. A quantized
leaf (a qwix QArray, model/quantization.py) is stored as two arrays under its path, "qvalue" and
"scale"; Meta's FP8 checkpoints hold the routed experts one per expert (checkpoints/fp8.py), each
tensor going to its expert's place in our stacked qvalues and scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from flax import traverse_util
from qwix import QArray

import model
from checkpoints.errors import CheckpointError
from model.config import Config
from model.quantization import quantized_shapes

Path = tuple[str, ...]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """HF tensor -> our leaves (`to_ours`, given our slab shape) and back (`to_hf`).

    `row_axis` is the axis of our (unstacked) leaf that the HF tensor's axis 0 becomes, so the
    tensor can move in slabs of HF rows without ever being whole in memory; None where the rows
    of the HF tensor mix into several of our axes (head reshapes) and the tensor moves whole.
    """
    name: str
    to_ours: Callable[[np.ndarray, Shape], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    hf_shape: Callable[[Shape], Shape]
    row_axis: int | None


IDENTITY = Transform("identity", lambda x, s: (x,), lambda y: y, lambda s: s, row_axis=0)
# nn.Linear stores [out, in]; we store [in, out] so activations contract on the left.
LINEAR = Transform("linear", lambda x, s: (x.T,), lambda y: y.T, lambda s: s[::-1], row_axis=1)
# q/k/v_proj.weight [N*H, D] -> [D, N, H].
HEADS_IN = Transform("heads_in", lambda x, s: (x.T.reshape(s),),
                     lambda y: y.reshape(y.shape[0], -1).T,
                     lambda s: (math.prod(s[1:]), s[0]), row_axis=None)
# o_proj.weight [D, N*H] -> [N, H, D]; HF rows are our last axis, so it can move in slabs.
HEADS_OUT = Transform("heads_out", lambda x, s: (x.T.reshape(s),),
                      lambda y: y.reshape(-1, y.shape[-1]).T,
                      lambda s: (s[-1], math.prod(s[:-1])), row_axis=2)
# Vision q/k/v_proj.bias [N*H] -> [N, H].
HEAD_BIAS = Transform("head_bias", lambda x, s: (x.reshape(s),), lambda y: y.reshape(-1),
                      lambda s: (math.prod(s),), row_axis=None)
# experts.gate_up_proj [E, D, 2F] (already [in, out]; gate, then up, on the last axis)
# -> two [E, D, F].
GATE_UP = Transform("gate_up", lambda x, s: (x[..., :s[-1]], x[..., s[-1]:]),
                    lambda gate, up: np.concatenate([gate, up], axis=-1),
                    lambda s: (*s[:-1], 2 * s[-1]), row_axis=0)

# (HF name, our leaf path(s) separated by spaces, transform).
TEXT_LAYER = (
    ("input_layernorm.weight", "attn_norm.scale", IDENTITY),
    ("self_attn.q_proj.weight", "attn.q", HEADS_IN),
    ("self_attn.k_proj.weight", "attn.k", HEADS_IN),
    ("self_attn.v_proj.weight", "attn.v", HEADS_IN),
    ("self_attn.o_proj.weight", "attn.o", HEADS_OUT),
    ("post_attention_layernorm.weight", "ffn_norm.scale", IDENTITY),
)
TEXT_MOE = (
    ("feed_forward.router.weight", "moe.router", LINEAR),
    ("feed_forward.experts.gate_up_proj", "moe.wi_gate moe.wi_up", GATE_UP),
    ("feed_forward.experts.down_proj", "moe.wo", IDENTITY),
    ("feed_forward.shared_expert.gate_proj.weight", "moe.shared.wi_gate", LINEAR),
    ("feed_forward.shared_expert.up_proj.weight", "moe.shared.wi_up", LINEAR),
    ("feed_forward.shared_expert.down_proj.weight", "moe.shared.wo", LINEAR),
)
TEXT_MLP = (
    ("feed_forward.gate_proj.weight", "mlp.wi_gate", LINEAR),
    ("feed_forward.up_proj.weight", "mlp.wi_up", LINEAR),
    ("feed_forward.down_proj.weight", "mlp.wo", LINEAR),
)
EMBED = ("embed_tokens.weight", "embed.embedding", IDENTITY)  # under the text-model prefix
FINAL_NORM = ("norm.weight", "final_norm.scale", IDENTITY)   # likewise
LM_HEAD = ("lm_head.weight", "lm_head.kernel", LINEAR)       # under the layout prefix
VISION_TOP = (  # under vision_model.
    ("patch_embedding.linear.weight", "vision.patch_embed.kernel", LINEAR),
    ("class_embedding", "vision.class_embedding", IDENTITY),
    ("positional_embedding_vlm", "vision.pos_embedding", IDENTITY),
    ("layernorm_pre.weight", "vision.pre_norm.scale", IDENTITY),
    ("layernorm_pre.bias", "vision.pre_norm.bias", IDENTITY),
    ("layernorm_post.weight", "vision.post_norm.scale", IDENTITY),
    ("layernorm_post.bias", "vision.post_norm.bias", IDENTITY),
    ("vision_adapter.mlp.fc1.weight", "vision.adapter.fc1", LINEAR),
    ("vision_adapter.mlp.fc2.weight", "vision.adapter.fc2", LINEAR),
)
VISION_LAYER = (  # under vision_model.model.layers.{i}., ours under vision.layers
    ("input_layernorm.weight", "attn_norm.scale", IDENTITY),
    ("input_layernorm.bias", "attn_norm.bias", IDENTITY),
    ("self_attn.q_proj.weight", "attn.q", HEADS_IN),
    ("self_attn.q_proj.bias", "attn.q_bias", HEAD_BIAS),
    ("self_attn.k_proj.weight", "attn.k", HEADS_IN),
    ("self_attn.k_proj.bias", "attn.k_bias", HEAD_BIAS),
    ("self_attn.v_proj.weight", "attn.v", HEADS_IN),
    ("self_attn.v_proj.bias", "attn.v_bias", HEAD_BIAS),
    ("self_attn.o_proj.weight", "attn.o", HEADS_OUT),
    ("self_attn.o_proj.bias", "attn.o_bias", IDENTITY),
    ("post_attention_layernorm.weight", "mlp_norm.scale", IDENTITY),
    ("post_attention_layernorm.bias", "mlp_norm.bias", IDENTITY),
    ("mlp.fc1.weight", "mlp.fc1", LINEAR),
    ("mlp.fc1.bias", "mlp.fc1_bias", IDENTITY),
    ("mlp.fc2.weight", "mlp.fc2", LINEAR),
    ("mlp.fc2.bias", "mlp.fc2_bias", IDENTITY),
)
PROJECTOR = ("multi_modal_projector.linear_1.weight", "projector.kernel", LINEAR)
# Meta's FP8 checkpoints: each routed expert as nn.Linear weights in float8_e4m3fn with their
# per-output-channel scales [out, 1], under feed_forward.experts.{e}. (instead of the fused
# gate_up_proj / down_proj), going to expert e of the quantized leaves.
FUSED_EXPERTS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
FP8_EXPERT = (
    ("gate_proj.weight", "moe.wi_gate.qvalue", LINEAR),
    ("gate_proj.weight_scale", "moe.wi_gate.scale", LINEAR),
    ("up_proj.weight", "moe.wi_up.qvalue", LINEAR),
    ("up_proj.weight_scale", "moe.wi_up.scale", LINEAR),
    ("down_proj.weight", "moe.wo.qvalue", LINEAR),
    ("down_proj.weight_scale", "moe.wo.scale", LINEAR),
)
# ... and those of a MoE layer its `ignore` list leaves in bf16: to the quantized leaf itself
BF16_EXPERT = tuple((hf, ours.removesuffix(".qvalue"), tr) for hf, ours, tr in FP8_EXPERT
                    if not hf.endswith("_scale"))

# The two key layouts found in the wild, by the prefix of the text model's keys:
# Llama4ForCausalLM (model.*, lm_head.weight) and Llama4ForConditionalGeneration, the published
# checkpoints (language_model.model.*, language_model.lm_head.weight).
LAYOUTS = {"causal_lm": "", "conditional_generation": "language_model."}


def detect_layout(names) -> str:
    return ("conditional_generation" if any(n.startswith("language_model.") for n in names)
            else "causal_lm")


def default_layout(cfg: Config) -> str:
    """The layout HF uses for this kind of model (with a vision tower or without)."""
    return "conditional_generation" if cfg.vision is not None else "causal_lm"


def param_shapes(cfg: Config, recipe: str | None = None) -> dict[Path, Shape]:
    """Every array of our parameter tree and its shape, flat, in the order the model declares
    them (model.param_shapes: the modules' own declaration); quantized by `recipe`, each
    quantized leaf as its qvalue and scale."""
    return {path: tuple(s.shape) for path, s in stored(cfg, recipe).items()}


def stored(cfg: Config, recipe: str | None = None) -> dict[Path, "jax.ShapeDtypeStruct"]:
    """The arrays a checkpoint of `cfg` quantized by `recipe` stores, abstract and flat; the
    unquantized leaves in the declared dtype (the checkpoint's own, in fact)."""
    return flat_arrays(quantized_shapes(cfg, recipe))


def flat_arrays(params) -> dict[Path, object]:
    """{path: array}: every leaf, a quantized one (QArray) as its qvalue and scale."""
    flat = {}
    for path, x in traverse_util.flatten_dict(params).items():
        if isinstance(x, QArray):
            flat |= {path + ("qvalue",): x.qvalue, path + ("scale",): x.scale}
        else:
            flat[path] = x
    return flat


def quantized_parts(flat: dict[Path, object]) -> set[Path]:
    """Which of these stored arrays are a quantized leaf's qvalue or scale (a norm's leaf is
    named "scale" too: a quantized leaf's scale is the one beside a qvalue)."""
    return {q for p in flat if p[-1] == "qvalue" for q in (p, p[:-1] + ("scale",))}


def tree(flat: dict[Path, object]):
    """The inverse of `flat_arrays`: nested params, each qvalue and scale joined in a QArray."""
    parts = quantized_parts(flat)
    out = {p: x for p, x in flat.items() if p not in parts}
    for p, x in flat.items():
        if p[-1] == "qvalue":
            out[p[:-1]] = QArray(x, flat[p[:-1] + ("scale",)], None, np.dtype(x.dtype))
    return traverse_util.unflatten_dict(out)


@dataclass(frozen=True)
class Key:
    """One HF tensor of a concrete checkpoint and where it lives in our tree."""
    hf: str
    ours: tuple[Path, ...]
    index: tuple[int, ...]   # position on the stacked axis of `ours` ((block,), (layer,) or ())
    shape: Shape             # shape of each of `ours` at `index`
    transform: Transform

    @property
    def hf_shape(self) -> Shape:
        return self.transform.hf_shape(self.shape)

    def slabs(self, slab_bytes: int) -> Iterator[tuple[slice, tuple, Shape]]:
        """(HF rows, index into our leaves, our slab shape) per slab of at most ~slab_bytes."""
        rows, n = slab_rows(self, slab_bytes), self.hf_shape[0]
        for start in range(0, n, rows):
            hf_rows = slice(start, start + rows)
            if rows == n:
                yield hf_rows, self.index, self.shape
                continue
            a = self.transform.row_axis
            idx = (*self.index, *(slice(None),) * a, hf_rows)
            yield hf_rows, idx, (*self.shape[:a], rows, *self.shape[a + 1:])


def slab_rows(key: Key, slab_bytes: int) -> int:
    """HF rows per slab: the largest divisor of the row count that keeps a slab under slab_bytes.

    A divisor, so that slabs tile the tensor evenly and can double as Orbax's chunk shape (a
    chunk written whole is never read back and rewritten). Sized for 4-byte elements so the
    answer does not depend on the dtype a tensor happens to be stored in.
    """
    shape = key.hf_shape
    if key.transform.row_axis is None:
        return shape[0]
    fits = max(1, slab_bytes // (4 * math.prod(shape[1:])))
    return max(d for d in range(1, min(fits, shape[0]) + 1) if shape[0] % d == 0)


def hf_keys(cfg: Config, layout: str, fp8_layers: frozenset[int] | None = None) -> list[Key]:
    """Every HF tensor the checkpoint of `cfg` holds, in HF's order (embeddings, layers, head).
    `fp8_layers`: Meta's FP8 layout (checkpoints/fp8.py), the routed experts stored one per
    expert, in fp8 with scales (FP8_EXPERT) in these layers, in bf16 (BF16_EXPERT) in the
    other MoE layers; our tree is then fp8_mixed's, where a bf16 expert's data goes to the
    quantized leaf itself (quantized as it passes: conversion.stored_slabs)."""
    shapes, period = param_shapes(cfg, None if fp8_layers is None else "fp8_mixed"), \
        cfg.text.period
    text, head = LAYOUTS[layout] + "model.", LAYOUTS[layout]
    out: list[Key] = []

    def add(hf, ours, transform, root=(), index=()):
        paths = tuple(root + tuple(p.split(".")) for p in ours.split())
        shape = shapes.get(paths[0]) or shapes[paths[0] + ("qvalue",)]
        out.append(Key(hf, paths, index, shape[len(index):], transform))

    add(text + EMBED[0], *EMBED[1:])
    for i, spec in enumerate(cfg.text.layer_specs):
        b, j = divmod(i, period)
        root = ("blocks", f"layer_{j}")
        for hf, ours, tr in TEXT_LAYER + (TEXT_MOE if spec.moe else TEXT_MLP):
            if fp8_layers is None or hf not in FUSED_EXPERTS:
                add(f"{text}layers.{i}.{hf}", ours, tr, root, (b,))
        if fp8_layers is not None and spec.moe:
            rows = FP8_EXPERT if i in fp8_layers else BF16_EXPERT
            for e in range(cfg.text.num_experts):
                for hf, ours, tr in rows:
                    add(f"{text}layers.{i}.feed_forward.experts.{e}.{hf}", ours, tr, root, (b, e))
    add(text + FINAL_NORM[0], *FINAL_NORM[1:])
    add(head + LM_HEAD[0], *LM_HEAD[1:])
    if cfg.vision is not None:
        for row in VISION_TOP:
            add("vision_model." + row[0], *row[1:])
        for i in range(cfg.vision.num_layers):
            for hf, ours, tr in VISION_LAYER:
                add(f"vision_model.model.layers.{i}.{hf}", ours, tr, ("vision", "layers"), (i,))
        add(*PROJECTOR)
    return out


def check(want: dict[str, Shape], found: dict[str, Shape], where: str,
          also: tuple[tuple[str, list[str]], ...] = ()):
    """Raise one CheckpointError naming every missing, unexpected and misshapen tensor (and any
    other (kind of problem, names) in `also`) at once."""
    missing = [n for n in want if n not in found]
    extra = sorted(n for n in found if n not in want)
    bad = [f"{n} {list(found[n])} (expected {list(s)})" for n, s in want.items()
           if n in found and tuple(found[n]) != tuple(s)]
    problems = [f"{len(names)} {what}: {listing(names)}" for what, names in
                (("missing", missing), ("unexpected", extra), ("of the wrong shape", bad), *also)
                if names]
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems))


def listing(names: list[str], limit: int = 25) -> str:
    """All names up to `limit` (a wrong layout would otherwise print a thousand of them)."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def ours_slabs(keys: list[Key], read_hf: Callable[[str, slice], np.ndarray], slab_bytes: int
               ) -> Iterator[tuple[Path, tuple, np.ndarray]]:
    """(our leaf, index into it, data) for every slab of every HF tensor, in key order."""
    for key in keys:
        for hf_rows, idx, shape in key.slabs(slab_bytes):
            for path, y in zip(key.ours, key.transform.to_ours(read_hf(key.hf, hf_rows), shape)):
                yield path, idx, y


def hf_slabs(key: Key, read_ours: Callable[[Path, tuple], np.ndarray], slab_bytes: int
             ) -> Iterator[np.ndarray]:
    """The HF tensor of `key`, as consecutive slabs of rows (contiguous runs of its bytes)."""
    for _, idx, _ in key.slabs(slab_bytes):
        yield key.transform.to_hf(*(read_ours(path, idx) for path in key.ours))


def leaf_slabs(keys: list[Key], read_ours: Callable[[Path, tuple], np.ndarray], slab_bytes: int
               ) -> Iterator[tuple[Path, tuple, np.ndarray]]:
    """(our leaf, index into it, data) as `ours_slabs` gives them, read from another copy of our
    tree: a copy whose writes land on the same slabs as a conversion's."""
    for key in keys:
        for _, idx, _ in key.slabs(slab_bytes):
            for path in key.ours:
                yield path, idx, read_ours(path, idx)
