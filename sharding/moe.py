"""Expert parallelism: the dropless grouped MoE path inside a `jax.shard_map`.

Design (the simplest correct one): the experts are split over the `expert` mesh axis (and each
expert's hidden width F over `tensor`); tokens are split over the batch axes. Inside the map,
1. each device all-gathers the tokens (and their top-k ids and scores) of its expert group: the
   devices that differ only in their `expert` coordinate;
2. runs its E/X local experts on the token copies routed to them: sorted by local expert, the
   copies for other devices' experts sorted last and left out of every group, so each device
   pays only for its own experts' tokens (dropless: no capacity, nothing dropped);
3. sums the partial outputs over `tensor` (each device holds F/Y of the hidden units) and
   reduce-scatters them over `expert`: every token gets its experts' outputs back, on the device
   it came from.
When the batch is too small to be split over `expert` (one prompt) the tokens are already
replicated over the group: step 1 is skipped and step 3 is a psum.

Communication per MoE layer, with T tokens per device, width D, X = expert-axis size and bytes b:
the all-gather receives (X-1)*T*D*b and the reduce-scatter sends as much, plus an all-reduce
of X*T*D*b over `tensor` when F is split. A ragged all-to-all would move only the k routed copies
(about 2*k*T*D*b: (X-1)/X of them cross devices) but needs per-destination counts exchanged
first and buffers sized for the worst case; the all-gather costs X/k times more bytes, which is
cheap within a host's NVLink domain or a TPU slice, and is exact and simple. The weights' `fsdp`
split is gathered before the map (by the partitioner, as everywhere in FSDP).

Numerics equal the single-device path: each token copy goes through the same SwiGLU rows, the
other devices add exact zeros, and only the `tensor` sum over F reorders a floating-point sum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.moe import swiglu_grouped


def local_experts(x, top_ids, scores, wi_gate, wi_up, wo, first):
    """Like model.moe.experts_grouped, for the experts first..first+E_local-1 held here.

    x [T, D], top_ids/scores [T, k] (global expert ids), weights [E_local, D, F] / [E_local, F, D].
    Copies routed elsewhere are sorted after every local group, given score 0 and masked out."""
    T, k = top_ids.shape
    E = wi_gate.shape[0]
    local = top_ids.reshape(-1) - first
    here = (local >= 0) & (local < E)
    key = jnp.where(here, local, E)                   # E: not here, sorted last
    order = jnp.argsort(key, stable=True)
    token = order // k
    s = jnp.where(here, scores.reshape(-1), 0)[order]
    xs = x[token] * s[:, None].astype(x.dtype)
    group_sizes = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)
    ys = swiglu_grouped(xs, wi_gate, wi_up, wo, group_sizes)
    ys = jnp.where(here[order][:, None], ys, 0)       # rows past the groups are undefined
    return jnp.zeros_like(x).at[token].add(ys)


def expert_parallel(plan, x, top_ids, scores, wi_gate, wi_up, wo):
    """The routed experts' output [T, D] for tokens x [T, D] (T = B * seq, split as the batch)."""
    tok = plan.axes("batch")
    ex = plan.axes("experts")
    hid = plan.axes("mlp")
    gather = tuple(a for a in ex if a in tok)         # expert axes the tokens are split over
    rest = tuple(a for a in ex if a not in tok)       # ... and those they are replicated over
    E = wi_gate.shape[0]
    n_ex = 1
    for a in ex:
        n_ex *= plan.mesh.shape[a]
    tok_spec = P(tok or None)
    w_in, w_out = P(ex or None, None, hid or None), P(ex or None, hid or None, None)

    def body(x, top_ids, scores, wi_gate, wi_up, wo):
        if gather:
            x, top_ids, scores = (jax.lax.all_gather(a, gather, axis=0, tiled=True)
                                  for a in (x, top_ids, scores))
        first = jax.lax.axis_index(ex) * (E // n_ex) if ex else 0
        y = local_experts(x, top_ids, scores, wi_gate, wi_up, wo, first)
        if hid:
            y = jax.lax.psum(y, hid)
        if gather:
            y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
        if rest:
            y = jax.lax.psum(y, rest)
        return y

    # check_vma=False: the CPU kernel's lax.cond joins a branch computed from tensor-split
    # weights with zeros that vary over fewer axes, which the varying-axes check rejects. The
    # collectives above are spelled out, and autodiff stays correct without the check.
    with jax.named_scope("expert_parallel"):
        return jax.shard_map(body, mesh=plan.mesh,
                             in_specs=(tok_spec, tok_spec, tok_spec, w_in, w_in, w_out),
                             out_specs=tok_spec, check_vma=False)(x, top_ids, scores, wi_gate,
                                                                  wi_up, wo)
