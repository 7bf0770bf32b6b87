"""The KV cache: a pytree passed in and returned, one entry per layer slot of the scanned block.

Chunked (RoPE) layers only ever look back within their 8192-token chunk, so they keep a ring
buffer of `attention_chunk_size` positions; global (NoPE) layers keep the whole history. Every
buffer slot remembers the absolute position it holds (-1: empty), and masks are computed from
those positions, so left-padded rows of a batch behave exactly like unpadded prompts.

    cache = {"layer_{j}": {"k": [nb, B, K, S, H], "v": [nb, B, K, S, H], "pos": [nb, B, S]}}

with S = C for chunked layers and S = max_len for global ones; nb = cfg.text.num_blocks. With
`cfg.kv_dtype` ("int8" or "fp8") "k" and "v" are qwix QArrays: int8 or float8_e4m3fn values and
one scale [..., S, 1] (the compute dtype) per head and position, set when the row is written
(model/quantization.py) and applied where attention reads it (kernels/quantized.py). The
slots sit next to head_dim so that both attention products read the buffers as they lie (batch
dims B, K leading), with no transpose of the whole cache at every decode step. The split
layouts of CPU inference hold each leaf's nb axis as separate buffers (`Runtime.view_cache`,
kernels/views.py), so that each block updates buffers of its own in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from qwix import QArray

from .config import Config, LayerSpec
from .quantization import QTYPES, empty_kv, quantize_kv

# Logical axes of each slot's stacked buffers (what sharding/ splits them over).
AXES = {"k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
        "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
        "pos": ("layers", "batch", "cache_seq")}


def buffer_len(cfg: Config, spec: LayerSpec, max_len: int) -> int:
    if spec.chunked:
        return min(cfg.text.attention_chunk_size, max_len)
    return max_len


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None, stacked: bool = True):
    """An empty cache; `stacked=False`: one block's, without the nb axis."""
    t = cfg.text
    dtype = jnp.dtype(dtype or cfg.dtype)
    lead = (t.num_blocks,) if stacked else ()
    cache = {}
    for j, spec in enumerate(t.block_specs):
        S = buffer_len(cfg, spec, max_len)
        shape = (*lead, batch, t.num_kv_heads, S, t.head_dim)
        empty = (lambda: jnp.zeros(shape, dtype)) if cfg.kv_dtype is None else (
            lambda: empty_kv(shape, cfg.kv_dtype, dtype))
        cache[f"layer_{j}"] = {"k": empty(), "v": empty(),
                               "pos": jnp.full((*lead, batch, S), -1, jnp.int32)}
    return cache


def room(cfg: Config, cache) -> int | None:
    """How many positions the cache's global (unchunked) buffers hold; None when every layer is
    chunked, its ring buffers never running out."""
    for j, spec in enumerate(cfg.text.block_specs):
        if not spec.chunked:
            return cache[f"layer_{j}"]["pos"].shape[-1]
    return None


def cache_bytes(cfg: Config, batch: int, context: int, bytes_per_value: float | None = None
                ) -> int:
    """Bytes of K and V for `context` tokens (positions are not counted: 4 bytes a slot):
    `bytes_per_value`, or as `cfg` stores them (the compute dtype, or cfg.kv_dtype's byte plus
    a compute-dtype scale per head_dim values)."""
    t = cfg.text
    if bytes_per_value is None:
        itemsize = np.dtype(cfg.dtype).itemsize
        bytes_per_value = itemsize if cfg.kv_dtype is None else (
            QTYPES[cfg.kv_dtype].dtype.itemsize + itemsize / t.head_dim)
    per_slot = 2 * t.num_kv_heads * t.head_dim * bytes_per_value
    return round(batch * per_slot * sum(buffer_len(cfg, s, context) for s in t.layer_specs))


def write(cache, new, positions):
    """Write every layer's new keys/values at their positions [B, T] (< 0: padding, not
    written): new = {"layer_{j}": {"k": [nb, B, T, K, H], "v": [nb, B, T, K, H]}}, as the layer
    scan yields them. The layers only read the cache and the writing happens here, once, in
    place: had each layer returned its updated buffers, the scan would copy the whole cache at
    every decode step. One block's cache of the split layouts and its new keys go without the nb
    axis (a block of prompt tokens, written after the block has read the cache)."""
    return {name: write_layer(layer, new[name]["k"], new[name]["v"], positions)
            for name, layer in cache.items()}


def write_layer(layer, k, v, positions):
    """One layer's buffers {"k": [*nb, B, K, S, H], ...} with k, v [*nb, B, T, K, H] written at
    positions [B, T] (< 0: not written); nb, the stacked blocks, or none for one block's cache.
    Slot = position mod S. When T > S only the last S positions of each row are kept (earlier
    ones would be overwritten anyway, and writing them would make the scatter ambiguous)."""
    S = layer["pos"].shape[-1]
    stacked = layer["pos"].shape[:-2]
    keep = (positions >= 0) & (positions > positions.max(axis=1, keepdims=True) - S)
    slot = jnp.where(keep, positions % S, S)  # S is out of range: dropped
    b = jnp.arange(positions.shape[0])[:, None]
    # Indices b and slot around a slice: the indexed view is [B, T, *nb, K, H].
    lead = range(len(stacked))

    def put(buffer, rows):  # one array: rows [*nb, B, T, K, H'] into buffer [*nb, B, K, S, H']
        return buffer.at[..., b, :, slot, :].set(
            jnp.moveaxis(rows, lead, range(2, 2 + len(stacked))).astype(buffer.dtype), mode="drop")

    out = {}
    for n, rows in (("k", k), ("v", v)):
        if isinstance(layer[n], QArray):  # quantized rows: values and scales written alike
            out[n] = jax.tree.map(put, layer[n], quantize_kv(rows, layer[n]))
        else:
            out[n] = put(layer[n], rows)
    out["pos"] = layer["pos"].at[..., b, slot].set(
        jnp.broadcast_to(positions, (*stacked, *positions.shape)), mode="drop")
    return out
