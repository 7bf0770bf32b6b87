"""Mixture of experts: sigmoid top-k router, score applied to the expert *input*, shared expert.

Three paths over the same weights, held equal by tests:
- `grouped`: dropless; token copies are sorted by expert and run through `jax.lax.ragged_dot`
  (on CPU, where ragged_dot has no fast kernel: rounds of matmuls batched over the experts, or
  a gather of the selected experts for a few rows), so each token pays for its k experts only.
- `dense`: the reference; every expert runs on every (pre-scaled, mostly zero) token, as HF does.
- split experts (`MoE(split_experts=True)`, decoding on CPU): every expert's weights are a
  parameter of their own, and each token copy switches to its expert (`experts_switched`).
Experts have no biases, so an unselected expert (score 0, input 0) contributes exactly 0.
Local letters: M, the token copies (T * k) sorted by expert; R, the rows an expert takes in
one round of `swiglu_rounds`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from .layers import MLP, current_plan, param, swiglu


def swiglu_ragged(xs, wi_gate, wi_up, wo, group_sizes):
    """SwiGLU of rows xs [M, D] sorted by expert; group_sizes [E] rows per expert -> [M, D]."""
    h = jax.nn.silu(jax.lax.ragged_dot(xs, wi_gate, group_sizes))
    h = h * jax.lax.ragged_dot(xs, wi_up, group_sizes)
    return jax.lax.ragged_dot(h, wo, group_sizes)


def swiglu_rounds(xs, wi_gate, wi_up, wo, group_sizes, rows: int | None = None):
    """The same as `swiglu_ragged`, for backends without a grouped-GEMM kernel (CPU lowers
    ragged_dot to masked dense work, ~6x slower here). In round r every expert takes the next
    `rows` rows R of its group, and one matmul batched over the experts runs them all. The
    weights are read where they lie: XLA:CPU would copy an expert's weights picked by a dynamic
    index before every matmul, and those copies cost more than the matmuls. Dropless: rounds go
    on until the largest group is done. The waste is the padding of each group to whole rounds;
    with all tokens on one expert it is the dense cost, the cost of the reference path.
    The loop length depends on the routing, so the gradient is written out (`_rounds_bwd`)."""
    M, E = xs.shape[0], group_sizes.shape[0]
    if rows is None:  # twice the balanced share, so that one round usually takes every group
        rows = int(min(M, max(8, 2 ** math.ceil(math.log2(max(2 * M // E, 1))))))
    return _rounds(xs, wi_gate, wi_up, wo, group_sizes, rows)


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
        x = xs_pad[src]                                               # [E, R, D]
        h = jax.nn.silu(jnp.einsum("ERD,EDF->ERF", x, wi_gate))
        h = h * jnp.einsum("ERD,EDF->ERF", x, wi_up)
        return y.at[src].set(jnp.einsum("ERF,EFD->ERD", h, wo), mode="drop")

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


def swiglu_gathered(xs, wi_gate, wi_up, wo, expert):
    """SwiGLU of a handful of rows xs [M, D] (decoding), row m through expert[m]: each row
    gathers its expert's weights, so a step reads only the selected experts, in one fused gather
    (a weight picked by a dynamic index is copied before a matmul on CPU anyway)."""
    h = jax.nn.silu(jnp.einsum("MD,MDF->MF", xs, wi_gate[expert]))
    h = h * jnp.einsum("MD,MDF->MF", xs, wi_up[expert])
    return jnp.einsum("MF,MFD->MD", h, wo[expert])


def swiglu_grouped(xs, wi_gate, wi_up, wo, group_sizes):
    """SwiGLU of rows xs [M, D] sorted by expert; group_sizes [E] rows per expert -> [M, D]."""
    M, E = xs.shape[0], group_sizes.shape[0]
    if jax.default_backend() != "cpu":
        return swiglu_ragged(xs, wi_gate, wi_up, wo, group_sizes)
    if M <= E:  # no more rows than experts: gathering reads less
        expert = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)
        return swiglu_gathered(xs, wi_gate, wi_up, wo, expert)
    return swiglu_rounds(xs, wi_gate, wi_up, wo, group_sizes)


def experts_grouped(x, top_ids, scores, wi_gate, wi_up, wo):
    """x [T, D], top_ids/scores [T, k], weights [E, D, F] / [E, F, D] -> [T, D]."""
    T, k = top_ids.shape
    E = wi_gate.shape[0]
    flat = top_ids.reshape(-1)                        # [T k]
    order = jnp.argsort(flat, stable=True)
    token = order // k                                # which token each sorted copy came from
    xs = x[token] * scores.reshape(-1)[order][:, None]
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    ys = swiglu_grouped(xs, wi_gate, wi_up, wo, group_sizes)
    return jnp.zeros_like(x).at[token].add(ys)


def experts_dense(x, top_ids, scores, wi_gate, wi_up, wo):
    """Reference: all E experts on all T tokens, inputs pre-scaled by the (mostly zero) score."""
    E = wi_gate.shape[0]
    full = jnp.zeros((x.shape[0], E), x.dtype).at[jnp.arange(x.shape[0])[:, None], top_ids].set(scores)
    xe = jnp.einsum("TD,TE->ETD", x, full)
    h = jax.nn.silu(jnp.einsum("ETD,EDF->ETF", xe, wi_gate)) * jnp.einsum("ETD,EDF->ETF", xe, wi_up)
    return jnp.einsum("ETF,EFD->TD", h, wo)


# The experts' weights, [E, ...] each, by the logical axes of one expert's slice. With split
# experts (model/split.py) expert e's slice is a parameter of its own, named "{name}_{e}".
EXPERT_WEIGHTS = {"wi_gate": ("embed", "mlp"), "wi_up": ("embed", "mlp"), "wo": ("mlp", "embed")}


def experts_switched(x, top_ids, scores, experts):
    """x [T, D], top_ids/scores [T, k]; experts: (wi_gate [D, F], wi_up [D, F], wo [F, D]) per
    expert, each a buffer of its own -> [T, D]. Each token copy runs through its expert alone,
    picked by `lax.switch`, so the matmuls read that expert's weights where they lie: a decoding
    step reads the selected experts once and copies none (see model/split.py for why on CPU)."""
    T, k = top_ids.shape
    xs = (x[:, None, :] * scores[..., None]).reshape(T * k, -1)            # [M, D]
    branches = [functools.partial(_swiglu_row, w) for w in experts]
    ys = jax.lax.map(lambda a: jax.lax.switch(a[0], branches, a[1]), (top_ids.reshape(-1), xs))
    return ys.reshape(T, k, -1).sum(axis=1)


def _swiglu_row(weights, x):  # a branch of experts_switched: x [D] -> [D]
    return swiglu(x, *weights)


class MoE(nn.Module):
    cfg: object
    impl: str = "grouped"  # grouped | dense
    split_experts: bool = False  # each expert's weights parameters of their own: experts_switched

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        t = self.cfg.text
        D, F, E = t.hidden_size, t.intermediate_size, t.num_experts
        size = {"embed": D, "mlp": F}
        dt = x.dtype
        router = param(self, "router", (D, E), ("embed", "experts"))
        B, T, _ = x.shape
        xt = x.reshape(B * T, D)
        logits = jnp.einsum("TD,DE->TE", xt, router.astype(dt))
        top_logits, top_ids = jax.lax.top_k(logits, t.experts_per_token)
        scores = jax.nn.sigmoid(top_logits.astype(jnp.float32)).astype(dt)
        # Router statistics for the load-balancing loss and per-expert load (training reads them).
        self.sow("intermediates", "router_logits", logits)
        if self.split_experts:
            experts = [tuple(param(self, f"{name}_{e}", tuple(size[a] for a in axes), axes)
                             for name, axes in EXPERT_WEIGHTS.items()) for e in range(E)]
            routed = experts_switched(xt, top_ids, scores, experts)
        else:
            wi_gate, wi_up, wo = (
                param(self, name, (E, *(size[a] for a in axes)), ("experts", *axes)).astype(dt)
                for name, axes in EXPERT_WEIGHTS.items())
            run = experts_grouped if self.impl == "grouped" else experts_dense
            if self.impl == "grouped" and current_plan() is not None:
                run = current_plan().experts  # expert parallelism: a shard_map around the same path
            routed = run(xt, top_ids, scores, wi_gate, wi_up, wo)
        shared = MLP(self.cfg, F, name="shared")(x)
        return shared + routed.reshape(B, T, D)
