"""Expert kernels: the routed experts over token copies xs [M, D], copy m going to expert ids[m]
and already scaled by its router score (model/moe.py), each returning ys [M, D] in copy order.

- `grouped`: dropless. Copies are sorted by expert and each expert's group runs through the
  SwiGLU kernel: `swiglu_ragged` (jax.lax.ragged_dot, a grouped GEMM on accelerators) or
  `swiglu_rounds` (CPU, where ragged_dot lowers to masked dense work). It is also the body of
  expert parallelism: sharding/ runs it inside a shard_map, `first` naming the experts a
  device holds.
- `switched`: each copy through its own expert, whose weights are buffers of their own (the
  "experts" layout of CPU decoding, kernels/views.py): the step reads only the selected experts.
- `dense`: the reference: every expert on every copy (zero where not routed), as HF runs it.
Experts have no biases, so an expert on a zero input gives exactly zero.
The weights come as stored, arrays or quantized (qwix QArrays): each kernel casts, or
dequantizes, what it reads (kernels/quantized.py), after picking the experts where it picks
them; `grouped` reads a quantized stack one expert at a time (`swiglu_by_expert`). Quantized
weights are for inference: they have no gradient here.
Local letters: M token copies; R rows an expert takes in one round of `swiglu_rounds`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from qwix import QArray

from ..layers import swiglu

# The routed experts' weights [E, D, F], [E, D, F], [E, F, D], by their names in an MoE layer.
EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")


def run(xs, ids, weights, rt):
    """The routed experts' outputs [M, D] for copies xs [M, D] going to experts ids [M], by the
    kernel `rt.experts`; `weights` = (wi_gate, wi_up, wo). With a placement the grouped kernel
    runs expert-parallel (sharding/ spells out the communication)."""
    if rt.experts == "dense":
        return dense(xs, ids, *weights)
    if rt.experts == "switched":
        return switched(xs, ids, weights)
    body = functools.partial(grouped, swiglu_kernel=SWIGLU[rt.experts])
    if rt.placement is None:
        return body(xs, ids, *weights)
    return rt.placement.dispatch_experts(body, xs, ids, *weights)


def grouped(xs, ids, wi_gate, wi_up, wo, *, swiglu_kernel, first: int | jax.Array = 0):
    """Copies xs [M, D] through the experts first .. first + E - 1 that `wi_gate` [E, D, F]
    holds; copies for other experts come back as zeros. Sorted by expert (those not here last,
    in no group), each expert's group through `swiglu_kernel`, then back in copy order."""
    E = wi_gate.shape[0]
    local = ids - first
    here = (local >= 0) & (local < E)
    key = jnp.where(here, local, E)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)
    if isinstance(wi_gate, QArray):  # a quantized stack is read one expert at a time
        swiglu_kernel = swiglu_by_expert
    ys = swiglu_kernel(xs[order], wi_gate, wi_up, wo, group_sizes)
    ys = jnp.where(here[order][:, None], ys, 0)       # rows past the groups are undefined
    return jnp.zeros_like(xs).at[order].set(ys, unique_indices=True)


def swiglu_by_expert(xs, wi_gate, wi_up, wo, group_sizes, rows: int | None = None):
    """The same as `swiglu_ragged`, for quantized weights (QArrays [E, D, F], [E, F, D]): a loop
    over the experts that have rows dequantizes one expert's weights and runs its group in rounds
    of `rows` rows R. Dequantizing the whole stack before a grouped matmul would hold a layer's
    experts in float (Scout: 4 GB in bf16 a layer, beside 1 GB of int4), and a block's layers
    at once where the compiler schedules them together; in the loop a layer holds one expert's.
    The loop takes the layer's quantized stack as an operand, which XLA copies out of the stacked
    layers (1 GB for Scout's int4): up to E / 4 rows instead gather their experts' weights (a
    quarter of the float stack, no more than that copy; one expert for one decoded token).
    No gradient: the loops' lengths depend on the routing; quantized weights are for inference."""
    M, D = xs.shape
    E = group_sizes.shape[0]
    if 4 * M <= E:
        expert = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)
        return swiglu_gathered(xs, wi_gate, wi_up, wo, expert)
    R = rows or _rows_per_round(M, E)
    start = jnp.cumsum(group_sizes) - group_sizes
    picked = jnp.argsort(group_sizes == 0, stable=True)   # the experts with rows first
    # R rows of padding: a round's window past the last row stays in bounds
    xs_pad = jnp.concatenate([xs, jnp.zeros((R, D), xs.dtype)])

    def expert(i, y):
        e = picked[i]
        w = tuple(a[e] for a in (wi_gate, wi_up, wo))     # QArrays [D, F], [D, F], [F, D]

        def one_round(r, y):
            at = start[e] + r * R
            new = swiglu(jax.lax.dynamic_slice_in_dim(xs_pad, at, R), *w)       # [R, D]
            mine = (r * R + jnp.arange(R) < group_sizes[e])[:, None]  # past it: the next group's
            old = jax.lax.dynamic_slice_in_dim(y, at, R)
            return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mine, new, old), at, 0)

        return jax.lax.fori_loop(0, (group_sizes[e] + R - 1) // R, one_round, y)

    y = jax.lax.fori_loop(0, jnp.sum(group_sizes > 0), expert, jnp.zeros_like(xs_pad))
    return y[:M]


def _rows_per_round(M: int, E: int) -> int:
    """Twice the balanced share of M rows over E experts (a power of two, 8 to M), so that one
    round usually takes a whole group."""
    return int(min(M, max(8, 2 ** math.ceil(math.log2(max(2 * M // E, 1))))))


def swiglu_ragged(xs, wi_gate, wi_up, wo, group_sizes):
    """SwiGLU of rows xs [M, D] sorted by expert; group_sizes [E] rows per expert -> [M, D]."""
    return swiglu(xs, wi_gate, wi_up, wo, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes))


def swiglu_rounds(xs, wi_gate, wi_up, wo, group_sizes, rows: int | None = None):
    """The same as `swiglu_ragged`, for backends without a grouped-GEMM kernel. In round r every
    expert takes the next `rows` rows R of its group, and one matmul batched over the experts runs
    them all. The weights are read where they lie: XLA:CPU would copy an expert's weights picked
    by a dynamic index before every matmul, and those copies cost more than the matmuls.
    Dropless: rounds go on until the largest group is done. The waste is the padding of each group
    to whole rounds; with all tokens on one expert it is the dense cost, the reference's.
    No more rows than experts (decoding) gather their experts' weights instead, which reads less.
    The loop length depends on the routing, so the gradient is written out (`_rounds_bwd`)."""
    M, E = xs.shape[0], group_sizes.shape[0]
    if M <= E:
        expert = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)
        return swiglu_gathered(xs, wi_gate, wi_up, wo, expert)
    rows = rows or _rows_per_round(M, E)
    return _rounds(xs, wi_gate, wi_up, wo, group_sizes, rows)


def swiglu_gathered(xs, wi_gate, wi_up, wo, expert):
    """SwiGLU of a handful of rows xs [M, D], row m through expert[m]: each row gathers its
    expert's weights (and scales), so a step reads and dequantizes only the selected experts."""
    return swiglu(xs, wi_gate[expert], wi_up[expert], wo[expert],
                  lambda a, w: jnp.einsum("MD,MDF->MF", a, w))


def _round_sources(group_sizes, rows: int, r, M: int):
    """Row of xs that each expert takes in round r: [E, R], M where its group has run out."""
    start = jnp.cumsum(group_sizes) - group_sizes
    rank = r * rows + jnp.arange(rows)                                # place within a group
    return jnp.where(rank < group_sizes[:, None], start[:, None] + rank, M)


def _with_zero_row(a):  # [M, D] -> [M + 1, D]: row M feeds the places past a group's end
    return jnp.concatenate([a, jnp.zeros((1, a.shape[1]), a.dtype)])


def _num_rounds(group_sizes, rows: int):
    return (group_sizes.max() + rows - 1) // rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _rounds(xs, wi_gate, wi_up, wo, group_sizes, rows):
    M = xs.shape[0]
    xs_pad = _with_zero_row(xs)

    def one_round(r, y):
        src = _round_sources(group_sizes, rows, r, M)
        # [E, R, D] through the batched experts [E, D, F] / [E, F, D]
        return y.at[src].set(swiglu(xs_pad[src], wi_gate, wi_up, wo), mode="drop")

    return jax.lax.fori_loop(0, _num_rounds(group_sizes, rows), one_round, jnp.zeros_like(xs))


def _rounds_fwd(xs, wi_gate, wi_up, wo, group_sizes, rows):
    return _rounds(xs, wi_gate, wi_up, wo, group_sizes, rows), (xs, wi_gate, wi_up, wo, group_sizes)


def _rounds_bwd(rows, residuals, dy):
    """The same rounds backwards: activations recomputed per round, weight gradients summed
    in place over the rounds (only the rounds that ran)."""
    xs, wi_gate, wi_up, wo, group_sizes = residuals
    M = xs.shape[0]
    xs_pad, dy_pad = _with_zero_row(xs), _with_zero_row(dy)

    def one_round(r, grads):
        dxs, dw_gate, dw_up, dwo = grads
        src = _round_sources(group_sizes, rows, r, M)
        x, g = xs_pad[src], dy_pad[src]                              # [E, R, D]; zero past a group
        a = jnp.einsum("ERD,EDF->ERF", x, wi_gate)
        b = jnp.einsum("ERD,EDF->ERF", x, wi_up)
        sig = jax.nn.sigmoid(a)
        dh = jnp.einsum("ERD,EFD->ERF", g, wo)
        da = dh * b * sig * (1 + a * (1 - sig))                       # silu'(a) = sig (1 + a (1 - sig))
        db = dh * a * sig
        dwo = dwo + jnp.einsum("ERF,ERD->EFD", a * sig * b, g)
        dw_gate = dw_gate + jnp.einsum("ERD,ERF->EDF", x, da)
        dw_up = dw_up + jnp.einsum("ERD,ERF->EDF", x, db)
        dx = jnp.einsum("ERF,EDF->ERD", da, wi_gate) + jnp.einsum("ERF,EDF->ERD", db, wi_up)
        return dxs.at[src].set(dx, mode="drop"), dw_gate, dw_up, dwo

    zeros = tuple(jnp.zeros_like(a) for a in (xs, wi_gate, wi_up, wo))
    grads = jax.lax.fori_loop(0, _num_rounds(group_sizes, rows), one_round, zeros)
    return (*grads, None)


_rounds.defvjp(_rounds_fwd, _rounds_bwd)

SWIGLU = {"ragged": swiglu_ragged, "rounds": swiglu_rounds}


def switched(xs, ids, weights):
    """xs [M, D], ids [M]; weights: (wi_gate, wi_up, wo), each Parts of E buffers [D, F] /
    [F, D] (or a QArray of such Parts) -> [M, D]. Each copy runs through its expert alone, picked
    by `lax.switch`, so the matmuls read that expert's weights where they lie, once, and copy none."""
    branches = [functools.partial(_one_expert, w) for w in zip(*map(_by_expert, weights))]
    return jax.lax.map(lambda a: jax.lax.switch(a[0], branches, a[1]), (ids, xs))


def _by_expert(w):
    """Parts of E buffers -> the E buffers; a QArray of such Parts -> E QArrays."""
    if isinstance(w, QArray):
        return [dataclasses.replace(w, qvalue=q, scale=s)
                for q, s in zip(w.qvalue.parts, w.scale.parts)]
    return w.parts


def _one_expert(weights, x):  # a branch of `switched`: x [D] -> [D]
    return swiglu(x, *weights)


def dense(xs, ids, wi_gate, wi_up, wo):
    """Reference: all E experts on all M copies, each expert's input zero where not routed; the
    down projection contracts the experts along with F (one [M, D] out, not E of them)."""
    xe = jnp.einsum("MD,ME->EMD", xs, jax.nn.one_hot(ids, wi_gate.shape[0], dtype=xs.dtype))
    return swiglu(xe, wi_gate, wi_up, wo, down=lambda h, w: jnp.einsum("EMF,EFD->MD", h, w))
