"""Weight quantization recipes: which leaves of the parameter tree are quantized, and how.

A quantized weight is the same leaf under the same name, held as a qwix `QArray` (qvalue plus a
float32 scale, a pytree) instead of an array; where it is read it is dequantized on use
(model/kernels/quantized.py). `quantize_params(cfg, params, recipe)` quantizes a tree,
`dequantize_params(params)` undoes it; the converter quantizes a checkpoint slab by slab with
the same `quantize` (every slab holds whole input axes: checkpoints/keys.py).

Recipes, with Meta's names (llama-models 0.3.0, `llama4/quantization/loader.py` and
`quantize_impls.py`; its MODEL_CARD is not in the wheel):
- int8: ours; llama-models has no int8 recipe for Llama 4. Symmetric int8, one scale per output
  channel (absmax / 127, rounded half to even, values in [-127, 127]), for every matrix of the
  text decoder but the embeddings, the norms and the router: attention q/k/v/o, the routed and
  shared experts, the dense MLPs and the LM head. Decoder only: the vision tower and the
  projector stay as they are.
- int4_mixed: the loader's int4_mixed quantizes the routed experts (w1, w3, w2) *and* the shared
  expert of every MoE layer; `int4_row_quantize` makes symmetric groups of 128 along the input
  axis K, scale = max(absmax, 1e-6) / 8, values round(x / scale) clamped to [-8, 7] (bf16
  activations). Attention, dense MLPs, embeddings, LM head, norms and router stay as they are.
  An input axis that 128 does not divide (test-sized models only) takes groups of gcd(K, 128).
- fp8_mixed: the loader's fp8_mixed quantizes the routed experts only, with `quantize_fp8`
  (fbgemm's quantize_fp8_per_row): float8_e4m3fn, one scale per output channel, absmax / 448;
  activations are quantized per row to fp8 before each expert product, their row max clamped to
  the loader's `fp8_activation_scale_ub` = 1200 (model/kernels/quantized.py).
  Deviation: Meta's loader skips the first and the last layer (`block.layer_id == 0 or
  == n_layers - 1`; in Maverick layer 0 is dense, so that is layer 47's experts); here the
  routed experts of every MoE layer are fp8. The stored tree stacks each weight over the blocks
  (layer 47 shares its leaves with the layers of the same slot in the other blocks), so one leaf
  has one dtype, and a second layout for one layer is not worth its code. A checkpoint in Meta's
  FP8 layout that leaves some layers' experts in bf16 has them quantized to fp8 as it loads, by
  this recipe (checkpoints/fp8.py).
Scales are float32 (as fbgemm's), rounding is half to even (torch.round's), values are divided
by the scale (Meta's int4; fbgemm multiplies by 448 / absmax, within an ulp of it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import traverse_util
from qwix import QArray, dequantize

from .config import Config

RECIPES = ("int8", "int4_mixed", "fp8_mixed")
GROUP = 128  # int4_mixed's group along the input axis


@dataclass(frozen=True)
class QType:
    """How one storage type quantizes: scale = max(absmax, floor) / divisor, values clipped to
    [lo, hi] (rounded first for integers)."""
    dtype: jnp.dtype
    divisor: float
    lo: float
    hi: float
    floor: float


QTYPES = {
    "int8": QType(jnp.dtype(jnp.int8), 127.0, -127.0, 127.0, 1e-12),
    "int4": QType(jnp.dtype(jnp.int4), 8.0, -8.0, 7.0, 1e-6),           # Meta's int4_row_quantize
    "fp8": QType(jnp.dtype(jnp.float8_e4m3fn), 448.0, -448.0, 448.0, 1e-12),  # fbgemm's fp8 rows
}


@dataclass(frozen=True)
class Scheme:
    """One leaf's quantization: its storage type, its input (reduced) axes, counted from the
    end, and the group along the one input axis (None: one scale per output channel)."""
    qtype: str
    axes: tuple[int, ...]
    group: int | None = None


# Input axes of each quantizable matrix, by leaf name: q/k/v [.., D, N, H], o [.., N, H, D],
# the FFN and expert matrices [.., D, F] / [.., F, D], the LM head [D, V].
INPUT_AXES = {"q": (-3,), "k": (-3,), "v": (-3,), "o": (-3, -2), "wi_gate": (-2,),
              "wi_up": (-2,), "wo": (-2,), "kernel": (-2,)}
_EXPERTS = ("wi_gate", "wi_up", "wo")


def scheme(recipe: str, path: tuple[str, ...]) -> Scheme | None:
    """How `recipe` quantizes the leaf at `path` of the parameter tree; None: left as it is."""
    check_recipe(recipe)
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    routed = parent == "moe" and name in _EXPERTS
    shared = parent == "shared" and path[-3:-2] == ("moe",) and name in _EXPERTS
    if recipe == "fp8_mixed":
        return Scheme("fp8", INPUT_AXES[name]) if routed else None
    if recipe == "int4_mixed":
        return Scheme("int4", INPUT_AXES[name], GROUP) if routed or shared else None
    decoder = path[0] == "blocks" and parent in ("attn", "moe", "shared", "mlp") or \
        path == ("lm_head", "kernel")
    return Scheme("int8", INPUT_AXES[name]) if decoder and name in INPUT_AXES else None


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose from {list(RECIPES)}")


def quantize(x, s: Scheme) -> QArray:
    """x quantized symmetrically by scheme `s`: the scale reduces `s.axes` (size 1 there), or,
    with a group, has one entry per group of `s.group` along the one input axis."""
    t = QTYPES[s.qtype]
    x32 = jnp.asarray(x, jnp.float32)
    axes = tuple(a % x32.ndim for a in s.axes)
    if s.group is None:
        absmax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
        scale = jnp.maximum(absmax, t.floor) / t.divisor
        v = x32 / scale
    else:
        (a,) = axes
        g = math.gcd(x32.shape[a], s.group)
        grouped = x32.reshape(*x32.shape[:a], x32.shape[a] // g, g, *x32.shape[a + 1:])
        scale = jnp.maximum(jnp.max(jnp.abs(grouped), axis=a + 1, keepdims=True),
                            t.floor) / t.divisor
        v = (grouped / scale).reshape(x32.shape)
        scale = scale.reshape(*x32.shape[:a], x32.shape[a] // g, *x32.shape[a + 1:])
    if jnp.issubdtype(t.dtype, jnp.integer):
        v = jnp.round(v)
    return QArray(jnp.clip(v, t.lo, t.hi).astype(t.dtype), scale, None, t.dtype)


def empty_kv(shape: tuple[int, ...], kv_dtype: str, scale_dtype) -> QArray:
    """An empty quantized KV-cache buffer [..., S, H]: one scale per (head, position)."""
    qtype = QTYPES[kv_dtype].dtype
    return QArray(jnp.zeros(shape, qtype), jnp.zeros((*shape[:-1], 1), scale_dtype), None, qtype)


def quantize_kv(x, like: QArray) -> QArray:
    """KV rows x [..., H] quantized as the cache buffer `like` holds them: one scale over
    head_dim per (head, position), by that buffer's storage type, in its scale's dtype."""
    kind = next(k for k, t in QTYPES.items() if t.dtype == jnp.dtype(like.qtype))
    q = quantize(x, Scheme(kind, (-1,)))
    return QArray(q.qvalue, q.scale.astype(like.scale.dtype), None, q.qtype)


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


def child_axes(axes, full: tuple[int, ...], child: tuple[int, ...]) -> tuple:
    """The axes (logical names, or the mesh axes of a PartitionSpec) of a quantized leaf's
    qvalue or scale, from the leaf's: the same, but None where the child reduces an axis to
    size 1 (a scale's reduced axes; its groups keep the weight's split)."""
    axes = (*axes, *(None,) * (len(full) - len(axes)))
    return tuple(None if c == 1 != f else a for a, f, c in zip(axes, full, child))


def quantize_params(cfg: Config, params, recipe: str):
    """params (the stored tree of `cfg`, arrays) with the leaves `recipe` names held as QArrays."""
    from .params import param_shapes
    check_recipe(recipe)
    flat = traverse_util.flatten_dict(params)
    done = sorted("/".join(p) for p, x in flat.items() if is_quantized(x))
    if done:
        raise ValueError(f"params are quantized already ({len(done)} leaves, e.g. {done[0]}); "
                         "dequantize_params first to quantize them by another recipe")
    declared = traverse_util.flatten_dict(param_shapes(cfg))
    bad = sorted("/".join(p) for p, x in flat.items()
                 if p not in declared or tuple(x.shape) != tuple(declared[p].shape))
    if bad:
        raise ValueError(f"params do not hold the tree the config declares: {bad[:10]}")
    return traverse_util.unflatten_dict(
        {p: quantize(x, s) if (s := scheme(recipe, p)) else x for p, x in flat.items()})


def dequantize_params(params, dtype=None):
    """The inverse of `quantize_params`: every QArray leaf dequantized, to `dtype` or to the
    dtype of the tree's other leaves."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    plain = {jnp.dtype(x.dtype) for x in leaves if not is_quantized(x)}
    dtype = dtype or (plain.pop() if len(plain) == 1 else jnp.float32)
    return jax.tree.map(lambda x: dequantize(x).astype(dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def quantized_shapes(cfg: Config, recipe: str | None):
    """The parameter tree of `cfg` quantized by `recipe` (None: as declared), abstract:
    ShapeDtypeStructs, QArrays of them where quantized. Nothing is allocated."""
    from .params import param_shapes
    shapes = param_shapes(cfg)
    if recipe is None:
        return shapes
    return jax.eval_shape(lambda p: quantize_params(cfg, p, recipe), shapes)


def recipe_of(cfg: Config, params) -> str | None:
    """The recipe whose quantized leaves, storage types and scale shapes `params` hold; None for
    unquantized params. A ValueError when they are quantized but match no recipe."""
    flat = traverse_util.flatten_dict(params)
    got = {p: _signature(x) for p, x in flat.items() if is_quantized(x)}
    if not got:
        return None
    for recipe in RECIPES:
        want = traverse_util.flatten_dict(quantized_shapes(cfg, recipe))
        if got == {p: _signature(x) for p, x in want.items() if is_quantized(x)}:
            return recipe
    raise ValueError(f"params hold {len(got)} quantized leaves (e.g. {'/'.join(min(got))}) in a "
                     f"layout that is none of the recipes {list(RECIPES)}")


def _signature(q: QArray):
    return jnp.dtype(q.qtype).name, tuple(q.qvalue.shape), tuple(q.scale.shape)
