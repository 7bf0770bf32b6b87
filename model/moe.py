"""Mixture of experts: sigmoid top-k router, score applied to the expert *input*, shared expert.

Two paths over the same parameters, held equal by a test:
- `grouped`: dropless; token copies are sorted by expert and run through `jax.lax.ragged_dot`
  (a tiled scan on CPU, where ragged_dot has no fast kernel), so each token pays for its k
  experts only.
- `dense`: the reference; every expert runs on every (pre-scaled, mostly zero) token, as HF does.
Experts have no biases, so an unselected expert (score 0, input 0) contributes exactly 0.
Local letter: M, the token copies (T * k) sorted by expert.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from .layers import MLP, current_plan, param


def swiglu_ragged(xs, wi_gate, wi_up, wo, group_sizes):
    """SwiGLU of rows xs [M, D] sorted by expert; group_sizes [E] rows per expert -> [M, D]."""
    h = jax.nn.silu(jax.lax.ragged_dot(xs, wi_gate, group_sizes))
    h = h * jax.lax.ragged_dot(xs, wi_up, group_sizes)
    return jax.lax.ragged_dot(h, wo, group_sizes)


def swiglu_tiled(xs, wi_gate, wi_up, wo, group_sizes, tile: int | None = None):
    """The same as `swiglu_ragged`, for backends without a grouped-GEMM kernel (CPU lowers
    ragged_dot to masked dense work, ~6x slower here): each expert's rows are padded to whole
    tiles and a scan runs one expert's SwiGLU per tile, skipping the unused tiles, so a decode
    step reads only the selected experts' weights. Dropless; the waste is at most one partial
    tile per expert."""
    M, D = xs.shape
    E = group_sizes.shape[0]
    if tile is None:  # about M/E rows an expert: 8..128, a power of two
        tile = int(min(128, max(8, 2 ** round(math.log2(max(M // E, 1))))))
    # Every used tile holds at least one row, so there are at most M of them.
    n_tiles = min(-(-M // tile) + E, M)
    padded = (group_sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    expert = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)   # [M]
    slot = padded_end[expert] - padded[expert] + jnp.arange(M) - start[expert]
    tile_start = jnp.arange(n_tiles) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), E - 1)
    x_tiles = jnp.zeros((n_tiles * tile, D), xs.dtype).at[slot].set(xs).reshape(n_tiles, tile, D)

    def one_tile(_, args):
        x, e, used = args  # x [tile, D]
        def run(x):
            h = jax.nn.silu(x @ wi_gate[e]) * (x @ wi_up[e])
            return h @ wo[e]
        return None, jax.lax.cond(used, run, jnp.zeros_like, x)

    used = tile_start < padded_end[-1]
    _, y = jax.lax.scan(one_tile, None, (x_tiles, tile_expert, used))
    return y.reshape(n_tiles * tile, D)[slot]


def swiglu_gathered(xs, wi_gate, wi_up, wo, group_sizes):
    """The same for a handful of rows (decoding): each row gathers its expert's weights, so a
    step reads only the selected experts; as one fused gather it also avoids the copy of a
    layer's whole expert stack that the tiled scan makes inside the layer scan on CPU."""
    M = xs.shape[0]
    expert = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=M)
    h = jax.nn.silu(jnp.einsum("MD,MDF->MF", xs, wi_gate[expert]))
    h = h * jnp.einsum("MD,MDF->MF", xs, wi_up[expert])
    return jnp.einsum("MF,MFD->MD", h, wo[expert])


def swiglu_grouped(xs, wi_gate, wi_up, wo, group_sizes):
    if jax.default_backend() != "cpu":
        return swiglu_ragged(xs, wi_gate, wi_up, wo, group_sizes)
    if xs.shape[0] <= group_sizes.shape[0]:  # no more rows than experts: gathering reads less
        return swiglu_gathered(xs, wi_gate, wi_up, wo, group_sizes)
    return swiglu_tiled(xs, wi_gate, wi_up, wo, group_sizes)


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


class MoE(nn.Module):
    cfg: object
    impl: str = "grouped"  # grouped | dense

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        t = self.cfg.text
        D, F, E = t.hidden_size, t.intermediate_size, t.num_experts
        dt = x.dtype
        router = param(self, "router", (D, E), ("embed", "experts"))
        wi_gate = param(self, "wi_gate", (E, D, F), ("experts", "embed", "mlp"))
        wi_up = param(self, "wi_up", (E, D, F), ("experts", "embed", "mlp"))
        wo = param(self, "wo", (E, F, D), ("experts", "mlp", "embed"))
        B, T, _ = x.shape
        xt = x.reshape(B * T, D)
        logits = jnp.einsum("TD,DE->TE", xt, router.astype(dt))
        top_logits, top_ids = jax.lax.top_k(logits, t.experts_per_token)
        scores = jax.nn.sigmoid(top_logits.astype(jnp.float32)).astype(dt)
        # Router statistics for the load-balancing loss and per-expert load (training reads them).
        self.sow("intermediates", "router_logits", logits)
        run = experts_grouped if self.impl == "grouped" else experts_dense
        if self.impl == "grouped" and current_plan() is not None:
            run = current_plan().experts  # expert parallelism: a shard_map around the same path
        routed = run(xt, top_ids, scores, wi_gate.astype(dt), wi_up.astype(dt), wo.astype(dt))
        shared = MLP(self.cfg, F, name="shared")(x)
        return shared + routed.reshape(B, T, D)
