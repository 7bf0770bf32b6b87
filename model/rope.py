"""Rotary position embedding, Llama 4 style: adjacent pairs (2i, 2i+1) rotate as complex numbers.

HF and Meta keep the q/k projection rows in this interleaved order (no NeoX permutation), so the
rotation below must pair neighbouring channels, not the two halves of the head.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """[H/2] inverse frequencies, llama3-scaled when `scaling` is given (computed in fp32 like HF)."""
    inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    if scaling is None:
        return inv
    s = scaling
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    # Between the two wavelengths frequencies are blended; with low == high (Scout after Meta's
    # fix) the band is empty, and the division by zero below only produces unused values.
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotate(x, positions, inv_freq):
    """Rotate pairs of x [B, T, N, H] by positions [B, T] x inv_freq [H/2]."""
    return rotate_by_angles(x, positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq))


def vision_angles(side: int, head_dim: int, theta: float) -> np.ndarray:
    """[side² + 1, H/2] angles of Llama 4's 2-D vision RoPE; the last row (class token) is zero.

    Patch p sits at column x = p % side, row y = p // side, counted from 1. The first H/4 pairs
    turn with x, the last H/4 with y, at frequencies theta^(-4k/H), k < H/4 (HF's
    Llama4VisionRotaryEmbedding, computed in fp32 as it does)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a vision head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freq = (1.0 / (np.float32(theta) ** (np.arange(0, 2 * quarter, 2, dtype=np.float32)
                                         / np.float32(2 * quarter)))).astype(np.float32)
    p = np.arange(side * side)
    x = (p % side + 1).astype(np.float32)[:, None] * freq  # [P, H/4]
    y = (p // side + 1).astype(np.float32)[:, None] * freq
    cls = np.zeros((1, 2 * quarter), np.float32)
    return np.concatenate([np.concatenate([x, y], axis=-1), cls], axis=0)


def rotate_by_angles(x, angles):
    """Rotate adjacent pairs of x [..., T, N, H] by angles [..., T, H/2], the same for every head
    (and for every batch row when angles have no batch axis)."""
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = x32[..., 0], x32[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
