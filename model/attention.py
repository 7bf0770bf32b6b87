"""Grouped-query attention for Llama 4's two layer kinds.

RoPE layers attend causally *within* chunks of C tokens (their queries and keys rotated, then,
in Scout, normalised per head by a weightless RMS norm). NoPE layers attend causally over the
whole context, their queries scaled by a temperature that grows with the position. How the
softmax runs (dense, blockwise, cuDNN; with a KV cache or without) is the runtime's kernel
choice: model/kernels/attention.py.
"""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from .config import Config, LayerSpec
from .kernels.attention import attend
from .kernels.quantized import dense
from .layers import merge_heads, param, rms_normalize
from .rope import inv_frequencies, rotate
from .runtime import Runtime


def temperature_scale(positions, floor_scale: float, attn_scale: float):
    """Per-token query scale of the NoPE layers: 1 + a * log(1 + floor((p + 1) / floor_scale))."""
    p = positions.astype(jnp.float32)
    return 1.0 + attn_scale * jnp.log1p(jnp.floor((p + 1.0) / floor_scale))


class Attention(nn.Module):
    cfg: Config
    spec: LayerSpec
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, x, positions, cache=None):
        """x [B, T, D], positions [B, T] (absolute, from 0; < 0 marks left padding).
        Without a cache the sequence must start at position 0 with no padding (training,
        scoring), and (out, None) is returned; with one, the cached keys are attended too and
        (out, new) returns what the cache needs (kernels.attention.attend)."""
        t = self.cfg.text
        D, N, K, H = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
        dt = x.dtype
        wq = param(self, "q", (D, N, H), ("embed", "heads", "head_dim"))
        wk = param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"))
        wv = param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"))
        wo = param(self, "o", (N, H, D), ("heads", "head_dim", "embed"))
        q = jnp.einsum("BTD,DNH->BTNH", x, dense(wq, dt))
        k = jnp.einsum("BTD,DKH->BTKH", x, dense(wk, dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, dense(wv, dt))
        if self.spec.rope:
            inv = inv_frequencies(H, t.rope_theta, t.rope_scaling)
            q, k = rotate(q, positions, inv), rotate(k, positions, inv)
            if t.use_qk_norm:
                q, k = rms_normalize(q, t.rms_norm_eps), rms_normalize(k, t.rms_norm_eps)
        elif t.attn_temperature_tuning:
            scale = temperature_scale(positions, t.floor_scale, t.attn_scale)
            q = (q * scale[:, :, None, None]).astype(dt)
        q = self.rt.constrain(q, ("batch", "seq", "heads", "head_dim"))
        k, v = (self.rt.constrain(a, ("batch", "seq", "kv_heads", "head_dim")) for a in (k, v))
        chunk = t.attention_chunk_size if self.spec.chunked else None
        out, new = attend(q, k, v, positions, cache, chunk, self.rt)
        return merge_heads(out, wo), new
