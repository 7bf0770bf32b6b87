"""Attention kernels: causal attention over a segment, within chunks, and over a KV cache.

`attend` is what the Attention module calls; the runtime says which kernel runs:
- no cache (training, a whole-sequence forward): up to `dense_max_len` keys a masked softmax
  per block of queries over the keys up to its last (none of the square above them), beyond
  it query and key blocks with an online softmax (memory O(block^2), not O(T^2)); or cuDNN's
  fused kernel (`jax.nn.dot_product_attention`) on GPUs in 16-bit. Chunked layers fold their
  chunks into the batch, so no T x T buffer exists for them.
- with a cache: masks from the absolute positions each slot holds (-1: empty), the cache read in
  blocks of `block` slots with an online softmax once it is longer than `dense_max_len` slots.
  Blocks that hold no key a query may see are skipped, so a long cache costs its filled part.
  A quantized cache (model/kv_cache.py) is dequantized where it is read: the whole buffer, or
  each block of slots; new keys and values are attended as the cache holds them (quantized and
  dequantized), as the split layouts of decoding, which write them before reading, see them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwix import QArray

from .. import kv_cache
from ..quantization import quantize_kv
from .quantized import dense

# Up to this many keys attention is a masked softmax (fastest on CPU); beyond, blocks of BLOCK.
DENSE_MAX_LEN = 2048
BLOCK = 512
# Below dense_max_len keys inference puts its queries in up to QUERY_BLOCKS blocks of QUERY_ROWS or
# more, each over the keys up to its last: the benchmark model's 4 x 512 prefill forward ran 20%
# faster on CPU than as one square, timed side by side. Training keeps the square:
# differentiated, the blocks took 21 s to compile against 9 s, for a step 7% faster.
QUERY_ROWS = 64
QUERY_BLOCKS = 8


def attend(q, k, v, positions, cache, chunk: int | None, rt):
    """q [B, T, N, H], k/v [B, T, K, H] at positions [B, T] -> (out [B, T, N, H], new): `new` is
    None without a cache, else the new keys and values {"k", "v"} [B, T, K, H] for
    kv_cache.write, or the layer's updated cache when the runtime writes it in the layers.
    With the "context" kernel the positions are split over devices, and the placement runs the
    attention across them (sharding/context.py) around the single-device pieces below."""
    kw = dict(dense_max_len=rt.dense_max_len, block=rt.block)
    context = rt.attention == "context"
    if cache is None:
        segment = dict(kw, impl=rt.attention, query_blocks=rt.phase != "train")
        if chunk is not None:  # chunks folded into the batch: local while shards hold whole chunks
            return chunked_causal_attention(q, k, v, chunk, **segment), None
        if context:
            local = functools.partial(attention_by_position, **kw)
            return rt.placement.gathered_attention(local, q, k, v, positions), None
        return causal_attention(q, k, v, **segment), None
    if context:
        kw["state_of_cache"] = functools.partial(rt.placement.cache_state, cache_state)
    if rt.writes_cache_first(chunk is not None):
        new = kv_cache.write_layer(cache, k, v, positions)
        return cached_attention(q, None, None, positions, new, chunk, **kw), new
    seen = [dense(quantize_kv(a, cache[n]), a.dtype) if isinstance(cache[n], QArray) else a
            for n, a in (("k", k), ("v", v))]
    out = cached_attention(q, *seen, positions, cache, chunk, fresh=rt.cache_empty, **kw)
    return out, {"k": k, "v": v}


def _by_head(qg):
    """Queries [B, T, K, G, H] -> [B, K, G, T, H], as the scores lie: given [B, T, K, G, H],
    XLA:CPU lays the product out by key and query and transposes the scores in every pass over
    them that follows (an 8192-token prompt ran at half the rate)."""
    return jnp.einsum("BTKGH->BKGTH", qg)


def _head_scores(qh, k):  # qh [B, K, G, T, H], k [B, K, S, H] -> scaled [B, K, G, T, S] in fp32
    return jnp.einsum("BKGTH,BKSH->BKGTS", qh, k, preferred_element_type=jnp.float32) * (
        qh.shape[-1] ** -0.5)


def _dense_causal(q, k, v, query_blocks: bool):
    """Causal attention as one masked softmax, or with `query_blocks` one per block of queries
    over the keys up to the block's last: the scores above the diagonal blocks are then never
    computed (for 512 queries in blocks of 64, 9/16 of the square is). -> [B, T, N, H]"""
    T = q.shape[1]
    rows = max(QUERY_ROWS, -(-T // QUERY_BLOCKS)) if query_blocks else T
    qh, kh = _by_head(q), k.swapaxes(1, 2)
    ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
    v1 = jnp.concatenate([v, ones], -1).swapaxes(1, 2)                         # [B, K, T, H + 1]
    return jnp.concatenate([_masked_softmax(qh[:, :, :, a:a + rows], kh[:, :, :a + rows],
                                            v1[:, :, :a + rows], a, v.dtype)
                            for a in range(0, T, rows)], axis=1)


def _masked_softmax(qh, kh, v1, first: int, dtype):
    """Queries qh [B, K, G, T, H] at positions first .. first + T - 1 over keys kh [B, K, S, H] at
    0 .. S - 1, causally; v1 [B, K, S, H + 1] the values with a column of ones -> [B, T, N, H].
    Normalised after the values are weighted (a division of the output [T, H], not a pass over
    the scores [T, S]); the weights' sums come out of the same matmul, from the column of ones
    (not from a pass over [T, S] either)."""
    T, S, H = qh.shape[3], kh.shape[2], kh.shape[3]
    s = jnp.where(jnp.tril(jnp.ones((T, S), bool), first), _head_scores(qh, kh), -jnp.inf)
    m = s.max(-1)
    acc = _weighted_values(jnp.exp(s - m[..., None]), v1)
    return normalized((m, acc[..., H], acc[..., :H]), dtype)


def _online_softmax(state, s, values):
    """Fold one block of keys into a running softmax: state = (max m [..., T], sum l [..., T],
    weighted values acc [..., T, H]) over the blocks so far (m = -inf before the first);
    s [..., T, S] the block's masked fp32 scores; values(p) = p @ V for the block -> [..., T, H]."""
    m_old, l, acc = state
    m = jnp.maximum(m_old, s.max(-1))
    p = jnp.exp(s - m[..., None])
    corr = jnp.exp(m_old - m)
    return m, l * corr + p.sum(-1), acc * corr[..., None] + values(p)


def _empty_softmax_state(B, K, G, T, H):
    return (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, H), jnp.float32))


def _blockwise_causal(q, k, v, block: int):
    """Online-softmax attention over key blocks: memory O(block^2) per query block, not O(T^2)."""
    B, T, K, G, H = q.shape
    n = -(-T // block)
    pad = n * block - T
    q, k, v = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v))
    kb, vb = (jnp.einsum("BnSKH->nBKSH", a.reshape(B, n, block, K, H)) for a in (k, v))
    causal = jnp.tril(jnp.ones((block, block), bool))

    def one_query_block(args):
        i, qi = args  # qi [B, K, G, block, H]

        @jax.checkpoint  # keep only the running (m, l, acc) for the backward pass
        def step(carry, j):
            def update(carry):
                s = jnp.where((j < i) | causal, _head_scores(qi, kb[j]), -jnp.inf)
                return _online_softmax(carry, s, lambda p: _weighted_values(p, vb[j]))
            return jax.lax.cond(j <= i, update, lambda c: c, carry), None

        init = _empty_softmax_state(B, K, G, block, H)
        (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(n))
        return (acc / l[..., None]).astype(v.dtype)  # [B, K, G, block, H]

    qb = jnp.einsum("BntKGH->nBKGtH", q.reshape(B, n, block, K, G, H))  # by head: see _by_head
    out = jax.lax.map(one_query_block, (jnp.arange(n), qb))  # [n, B, K, G, block, H]
    out = jnp.einsum("nBKGtH->BntKGH", out).reshape(B, n * block, K * G, H)
    return out[:, :T]


def causal_attention(q, k, v, *, impl: str = "xla", dense_max_len: int = DENSE_MAX_LEN,
                     block: int = BLOCK, query_blocks: bool = False):
    """Causal GQA over one segment. q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H];
    `query_blocks`: the dense softmax by blocks of queries (inference, `_dense_causal`)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    qg = q.reshape(B, T, K, N // K, H)
    if T <= dense_max_len:
        return _dense_causal(qg, k, v, query_blocks)
    return _blockwise_causal(qg, k, v, block)


def chunked_causal_attention(q, k, v, chunk: int, **kw):
    """Causal attention inside consecutive chunks of `chunk` tokens (chunks folded into batch)."""
    B, T, N, H = q.shape
    if T <= chunk:
        return causal_attention(q, k, v, **kw)
    n = -(-T // chunk)
    pad = n * chunk - T
    # Padding sits after every real token of the last chunk, so causality already hides it.
    fold = lambda a: jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(
        B * n, chunk, *a.shape[2:])
    out = causal_attention(fold(q), fold(k), fold(v), **kw)
    return out.reshape(B, n * chunk, N, H)[:, :T]


def _cached_scores(qh, q_pos, k, k_pos, chunk: int | None):
    """Masked scores [B, K, G, T, S] (fp32) of queries qh [B, K, G, T, H] at q_pos [B, T] over
    keys k [B, K, S, H] at k_pos [B, S] (-1: empty). A finite floor keeps padding queries
    (nothing allowed) finite; real rows are unaffected, as exp(-1e30 - max) is exactly 0."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]                          # [B, T, 1], [B, 1, S]
    allowed = (kp >= 0) & (kp <= qp)
    if chunk is not None:
        allowed &= kp // chunk == qp // chunk
    return jnp.where(allowed[:, None, None], _head_scores(qh, k), -1e30)


def cache_state(qg, q_pos, layer_cache, chunk: int | None, *, dense_max_len: int = DENSE_MAX_LEN,
                block: int = BLOCK):
    """The online-softmax state (m, l, acc) of queries qg [B, T, K, G, H] at positions q_pos
    [B, T] over every slot of one layer's cache {"k", "v": [B, K, S, H], "pos": [B, S]}: one
    masked score tensor up to `dense_max_len` slots, beyond it `block` slots at a time, so that
    no score tensor spans a long context and no copy of the cache is made."""
    S = layer_cache["pos"].shape[-1]
    if S > dense_max_len:
        return _cache_blocks(qg, q_pos, layer_cache, chunk, min(block, S))
    B, T, K, G, H = qg.shape
    k, v = (dense(layer_cache[n], qg.dtype) for n in ("k", "v"))
    return _online_softmax(_empty_softmax_state(B, K, G, T, H),
                           _cached_scores(_by_head(qg), q_pos, k, layer_cache["pos"], chunk),
                           lambda p: _weighted_values(p, v))


def cached_attention(q, k_new, v_new, q_pos, layer_cache, chunk: int | None,
                     fresh: bool = False, *, dense_max_len: int = DENSE_MAX_LEN,
                     block: int = BLOCK, state_of_cache=cache_state):
    """Attention of new queries [B, T, N, H] at positions q_pos [B, T] over the cached keys plus
    the new ones k_new/v_new [B, T, K, H] (None: already written into the cache); masks come
    from absolute positions (cache slots hold -1 when empty). `fresh`: the cache is known to be
    empty (a prompt's first piece), so only the new keys are looked at.

    The new keys are attended beside the buffers rather than written into them first whenever
    one may land in a ring-buffer slot whose old key a query here still needs (a piece of a
    prompt crossing a chunk boundary); the layers then only read the cache (see kv_cache.write).
    The cache's part is one online-softmax state (`state_of_cache`: `cache_state`, or a context-
    parallel one that merges the states of each device's slice), the new keys folded in last."""
    B, T, N, H = q.shape
    K = layer_cache["k"].shape[1]
    qg = q.reshape(B, T, K, N // K, H)
    state = (_empty_softmax_state(B, K, N // K, T, H) if fresh else
             state_of_cache(qg, q_pos, layer_cache, chunk, dense_max_len=dense_max_len,
                            block=block))
    if k_new is not None:
        v_new = v_new.swapaxes(1, 2)
        s = _cached_scores(_by_head(qg), q_pos, k_new.swapaxes(1, 2),
                           jnp.where(q_pos >= 0, q_pos, -1), chunk)
        state = _online_softmax(state, s, lambda p: _weighted_values(p, v_new))
    return normalized(state, q.dtype)


def attention_by_position(q, k, v, q_pos, k_pos, *, dense_max_len: int = DENSE_MAX_LEN,
                          block: int = BLOCK):
    """Causal attention of queries q [B, T, N, H] at q_pos [B, T] over keys k, v [B, S, K, H] at
    k_pos [B, S], masked by position (a key at or before its query): a context-parallel global
    layer's queries against the gathered keys of the whole sequence."""
    B, T, N, H = q.shape
    K = k.shape[2]
    keys = {"k": k.swapaxes(1, 2), "v": v.swapaxes(1, 2), "pos": k_pos}
    state = cache_state(q.reshape(B, T, K, N // K, H), q_pos, keys, None,
                        dense_max_len=dense_max_len, block=block)
    return normalized(state, q.dtype)


def normalized(state, dtype):
    """The attention output [B, T, N, H] of a finished online-softmax state."""
    _, l, acc = state
    return _heads_last((acc / l[..., None]).astype(dtype))


def _heads_last(out):  # [B, K, G, T, H] -> [B, T, N, H]
    B, K, G, T, H = out.shape
    return jnp.einsum("BKGTH->BTKGH", out).reshape(B, T, K * G, H)


def _weighted_values(p, v):  # p [B, K, G, T, S], v [B, K, S, H] -> [B, K, G, T, H] in fp32
    return jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _cache_blocks(qg, q_pos, layer_cache, chunk: int | None, block: int):
    """The online-softmax state after every cache slot, visited `block` slots at a time. A block
    that holds no key any query here may see (empty, or every key past the last query, or for a
    chunked layer before the first query's chunk) is skipped, not scored: a prompt piece or a
    decode step costs the filled part of a long cache, not the allocated one."""
    B, T, K, G, H = qg.shape
    S = layer_cache["pos"].shape[-1]
    real = q_pos >= 0
    last = jnp.max(jnp.where(real, q_pos, -1))
    first = jnp.min(jnp.where(real, q_pos, jnp.iinfo(q_pos.dtype).max))
    first = 0 if chunk is None else first // chunk * chunk
    visible = lambda pos: (pos >= first) & (pos <= last)  # noqa: E731
    # Where no query sees any key (a call of padding alone) block 0 is scored all the same, so
    # that the state holds the finite floor of `_cached_scores`, as with every block scored.
    blind = ~jnp.any(visible(layer_cache["pos"]))
    qh = _by_head(qg)  # once, not in every block

    def step(state, j):
        # The last block is moved back to end at slot S; the slots it shares with the block
        # before are masked as empty, so that no key counts twice.
        start = jnp.minimum(j * block, S - block)
        pos = jax.lax.dynamic_slice_in_dim(layer_cache["pos"], start, block, axis=1)
        pos = jnp.where(start + jnp.arange(block) >= j * block, pos, -1)

        def fold(state):
            k, v = (dense(jax.tree.map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, start, block, axis=2), layer_cache[n]),
                qg.dtype) for n in ("k", "v"))
            s = _cached_scores(qh, q_pos, k, pos, chunk)
            return _online_softmax(state, s, lambda p: _weighted_values(p, v))

        seen = jnp.any(visible(pos)) | ((j == 0) & blind)
        return jax.lax.cond(seen, fold, lambda state: state, state), None

    state, _ = jax.lax.scan(step, _empty_softmax_state(B, K, G, T, H), jnp.arange(-(-S // block)))
    return state
