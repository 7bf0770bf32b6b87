"""Attention kernels (model/kernels/attention.py): the blockwise, chunked and cached paths against a
plain masked softmax; temperature tuning and RoPE scaling against the documented values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import temperature_scale
from model.config import RopeScaling
from model.kernels import attention as A
from model.rope import inv_frequencies


def _reference(q, k, v, allowed):  # allowed [T, S] bool
    B, T, N, H = q.shape
    K = k.shape[2]
    kr, vr = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    s = jnp.einsum("BTNH,BSNH->BNTS", q, kr) / np.sqrt(H)
    s = jnp.where(allowed, s, -jnp.inf)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(s, -1), vr)


def _qkv(T, B=2, N=4, K=2, H=8, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K)]


@pytest.mark.parametrize("T", [1, 65, 197, 600])
def test_dense_query_blocks_equal_one_masked_softmax(T):
    """The dense path in query blocks (a partial last one; 600 queries: 8 blocks of 75) against
    the whole square, masked."""
    q, k, v = _qkv(T, B=1)
    out = A.causal_attention(q, k, v, query_blocks=True)
    np.testing.assert_allclose(out, _reference(q, k, v, np.tril(np.ones((T, T), bool))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 7, 64, 100])
def test_blockwise_equals_dense(T):
    q, k, v = _qkv(T)
    causal = np.tril(np.ones((T, T), bool))
    out = A.causal_attention(q, k, v, dense_max_len=0, block=16)
    np.testing.assert_allclose(out, _reference(q, k, v, causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, C", [(5, 8), (8, 8), (29, 8), (64, 16)])
def test_chunked_equals_block_diagonal_mask(T, C):
    q, k, v = _qkv(T)
    i = np.arange(T)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] // C == i[:, None] // C)
    np.testing.assert_allclose(A.chunked_causal_attention(q, k, v, C),
                               _reference(q, k, v, allowed), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(A.chunked_causal_attention(q, k, v, C, dense_max_len=0, block=4),
                               _reference(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_chunked_attention_never_builds_a_txt_buffer():
    T, C = 4096, 256
    q, k, v = _qkv(T, B=1, N=2, K=1, H=4)
    hlo = jax.jit(lambda q, k, v: A.chunked_causal_attention(q, k, v, C, query_blocks=True)
                  ).lower(q, k, v).as_text()
    rows = min(C, max(A.QUERY_ROWS, -(-C // A.QUERY_BLOCKS)))  # a chunk's queries per block
    assert f"{T}x{T}" not in hlo and f"{rows}x{C}" in hlo


def test_temperature_scale_steps_at_the_documented_position():
    # docs/architecture.md, section 2: 1.0 up to p = 8190, then 1 + 0.1 ln 2 from p = 8191.
    s = temperature_scale(jnp.array([0, 8190, 8191, 16382, 16383]), 8192.0, 0.1)
    np.testing.assert_allclose(s, [1, 1, 1 + 0.1 * np.log(2), 1 + 0.1 * np.log(2),
                                   1 + 0.1 * np.log(3)], rtol=1e-6)


def test_scout_rope_scaling_keeps_35_frequencies():
    # docs/architecture.md, section 1: with factor 16, low == high == 1, theta 5e5, dim 128: 35
    # kept, 29 divided by 16.
    plain = inv_frequencies(128, 500000.0, None)
    scaled = inv_frequencies(128, 500000.0, RopeScaling(16.0, 1.0, 1.0, 8192))
    kept = np.isclose(scaled, plain, rtol=0)
    assert kept.sum() == 35 and np.allclose(scaled[~kept], plain[~kept] / 16)
    assert np.all(np.isfinite(scaled))


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("chunk", [None, 8])
def test_cached_attention_in_blocks_equals_dense(T, chunk):
    """A long cache is read block by block (online softmax, new keys last); here with blocks of
    4 over 21 slots (the last block overlaps), a wrapped ring in row 0, empty slots in row 1."""
    B, N, K, H, S = 2, 4, 2, 8, 21
    r = np.random.default_rng(T)
    pos = np.full((B, S), -1)
    for p in range(30):              # row 0: positions 0..29 written as a ring (9..29 remain)
        pos[0, p % S] = p
    pos[1, :11] = np.arange(11)      # row 1: positions 0..10, the rest empty
    cache = {"k": jnp.asarray(r.normal(size=(B, K, S, H)), jnp.float32),
             "v": jnp.asarray(r.normal(size=(B, K, S, H)), jnp.float32), "pos": jnp.asarray(pos)}
    q, k_new, v_new = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    q_pos = jnp.asarray(np.stack([30 + np.arange(T), 11 + np.arange(T)]))
    dense = A.cached_attention(q, k_new, v_new, q_pos, cache, chunk)
    blocks = A.cached_attention(q, k_new, v_new, q_pos, cache, chunk, dense_max_len=4, block=4)
    np.testing.assert_allclose(blocks, dense, rtol=1e-5, atol=1e-5)
    # No score tensor over the whole cache (the dense path has one, [.., T, S]).
    hlo = lambda **kw: jax.jit(lambda q: A.cached_attention(  # noqa: E731
        q, k_new, v_new, q_pos, cache, chunk, **kw)).lower(q).as_text()
    scores = f"x{T}x{S}xf32>"
    assert scores in hlo() and scores not in hlo(dense_max_len=4, block=4)


@pytest.mark.parametrize("chunk", [None, 8])
def test_cached_attention_skips_blocks_no_query_sees(chunk):
    """Read in blocks, a cache costs its filled part: blocks of slots that are empty, or (for a
    chunked layer) hold only keys before the queries' chunk, are not scored. Their keys and
    values here are NaN, which any scoring of them (even masked: 0 * NaN) would spread."""
    B, N, K, H, S, T = 1, 4, 2, 8, 24, 2
    r = np.random.default_rng(0)
    pos = np.full((B, S), -1)
    pos[0, :18] = np.arange(18)               # positions 0..17 in slots 0..17, the rest empty
    k, v = (r.normal(size=(B, K, S, H)) for _ in range(2))
    unseen = pos[0] < 0 if chunk is None else (pos[0] < 0) | (pos[0] < 16)
    unseen[(np.arange(S) // 4) == 4] = False  # block 4 (slots 16..19) is scored: keep it finite
    k[..., unseen, :], v[..., unseen, :] = np.nan, np.nan
    cache = {"k": jnp.asarray(k, jnp.float32), "v": jnp.asarray(v, jnp.float32),
             "pos": jnp.asarray(pos)}
    clean = {**cache, **{n: jnp.nan_to_num(cache[n]) for n in ("k", "v")}}
    q, k_new, v_new = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    q_pos = jnp.asarray([[18, 19]])
    blocks = A.cached_attention(q, k_new, v_new, q_pos, cache, chunk, dense_max_len=4, block=4)
    dense = A.cached_attention(q, k_new, v_new, q_pos, clean, chunk)
    assert np.all(np.isfinite(blocks))
    np.testing.assert_allclose(blocks, dense, rtol=1e-5, atol=1e-5)
