"""Context parallelism: the sequence and the KV cache split along positions over a mesh axis.

The rules map the logical "seq" axis (activations: a prompt piece, a training row) and
"cache_seq" (the KV cache's slots) onto the `context` mesh axis. Most of the model then runs
on its own slice of positions as it is: norms, projections, MLPs and experts work token by token
(the partitioner keeps them local), and chunked RoPE layers fold their chunks into the batch, which
stays local whenever every shard holds whole chunks (T / context a multiple of the chunk size;
otherwise the partitioner moves the straddling chunks between neighbours itself: correct, at the
cost of that exchange). Attention across positions is where devices must talk, and it is spelled
out here, around the model's own kernels (model/kernels/attention.py):

- Global (NoPE) layers without a cache (training, a whole-sequence forward): each device
  all-gathers the keys and values of the whole sequence and attends its own queries to them,
  masked by position, in blocks with an online softmax. Per layer and device that receives
  (c - 1)/c * T * K * H * 2 values (keys and values; c the context size) and holds T * K * H * 2,
  the same bytes as a ring that passes key blocks around the axis, in one collective, where a
  ring would hold only T/c of them at a time. Sequences this path sees are training lengths
  (long prompts go through the cache in pieces, below), where the gathered keys are small next to
  the activations, so the simpler all-gather is used; a ring is the way past that.
- With a cache (prefill pieces, decoding): each device scores the queries against its own slice
  of slots, and the partial softmax states (max m, sum l, weighted values acc) are merged across
  the axis: m = pmax(m_i), l = psum(l_i e^(m_i - m)), acc = psum(acc_i e^(m_i - m)). A piece
  split over the axis first all-gathers its queries (piece-sized) and keeps its own rows of the
  merged state. So one sequence's cache can exceed one device, and the communication per layer
  is a few piece-sized collectives whatever the context length.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _gather(x, axes, axis: int):
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def _own_rows(x, axes, axis: int, n: int):
    """This device's n rows along `axis` of an array gathered over `axes`."""
    if not axes:
        return x
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axes) * n, n, axis=axis)


def gathered_attention(plan, local, q, k, v, positions):
    """Attention [B, T, N, H] of a global layer's queries q [B, T, N, H] over the keys k, v
    [B, T, K, H] at positions [B, T], T split over the context axis: every device gathers the keys
    and values and runs `local(q, k, v, q_pos, k_pos)` on its own queries."""
    seq = plan.axes("seq")
    q_spec = plan.spec(("batch", "seq", "heads", "head_dim"), q.shape, "queries")
    kv_spec = plan.spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, "keys")
    pos_spec = plan.spec(("batch", "seq"), positions.shape, "positions")

    def body(q, k, v, pos):
        k, v, k_pos = (_gather(a, seq, 1) for a in (k, v, pos))
        return local(q, k, v, pos, k_pos)

    with jax.named_scope("context_gathered_attention"):
        return jax.shard_map(body, mesh=plan.mesh, in_specs=(q_spec, kv_spec, kv_spec, pos_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v, positions)


def cache_state(plan, local, qg, q_pos, layer_cache, chunk, **kw):
    """The online-softmax state (m, l, acc) of queries qg [B, T, K, G, H] at q_pos [B, T] over one
    layer's cache whose slots are split over the context axis: each device runs `local` (the
    model's single-device `cache_state`) on its slice, the states are merged across the axis."""
    seq, slots = plan.axes("seq"), plan.axes("cache_seq")
    B, T, K, G, H = qg.shape
    qg_spec = plan.spec(("batch", "seq", "kv_heads", None, "head_dim"), qg.shape, "queries")
    pos_spec = plan.spec(("batch", "seq"), q_pos.shape, "query positions")
    kv_spec = plan.spec(("batch", "kv_heads", "cache_seq", "head_dim"),
                        layer_cache["k"].shape, "cached keys")
    slot_spec = plan.spec(("batch", "cache_seq"), layer_cache["pos"].shape, "cache positions")
    ml_spec = plan.spec(("batch", "kv_heads", None, "seq"), (B, K, G, T), "softmax state")
    acc_spec = plan.spec(("batch", "kv_heads", None, "seq", None), (B, K, G, T, H),
                         "softmax state")
    t_local = T // math.prod(plan.mesh.shape[a] for a in seq)

    def body(qg, q_pos, k, v, pos):
        qg, q_pos = _gather(qg, seq, 1), _gather(q_pos, seq, 1)
        m, l, acc = local(qg, q_pos, {"k": k, "v": v, "pos": pos}, chunk, **kw)
        if slots:
            top = jax.lax.pmax(m, slots)
            w = jnp.exp(m - top)
            m, l, acc = top, jax.lax.psum(l * w, slots), jax.lax.psum(acc * w[..., None], slots)
        return (_own_rows(m, seq, 3, t_local), _own_rows(l, seq, 3, t_local),
                _own_rows(acc, seq, 3, t_local))

    with jax.named_scope("context_cache_state"):
        return jax.shard_map(
            body, mesh=plan.mesh, in_specs=(qg_spec, pos_spec, kv_spec, kv_spec, slot_spec),
            out_specs=(ml_spec, ml_spec, acc_spec), check_vma=False)(
                qg, q_pos, layer_cache["k"], layer_cache["v"], layer_cache["pos"])
