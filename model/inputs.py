"""Checks of what a caller hands to generation: sampling settings, counts, token ids, pixel values,
and the logits that come back from the prompt. Each raises one ValueError saying what is wrong and
where; each is a pure function of its arguments, so any entry point can call it before work starts.

Without them the failures are silent: a NaN temperature or a NaN pixel samples garbage, float
token ids are truncated to other tokens and ids outside the vocabulary read as others, `top_k=0`
or `stream_every=-1` yields no tokens, and a checkpoint with NaN weights decodes token 0 forever.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config_checks import is_int, is_real


def check_count(name: str, n, minimum: int = 1):
    """An integer count of at least `minimum` (max_new_tokens, stream_every, ...)."""
    if not is_int(n) or n < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {n!r}")


def check_decoding(vocab_size: int, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                   stream_every=None):
    """max_new_tokens (and stream_every, unless None) integers >= 1; temperature a finite number
    >= 0 (0: greedy); top_k None or 1..vocab_size; top_p None or in (0, 1]."""
    check_count("max_new_tokens", max_new_tokens)
    if stream_every is not None:
        check_count("stream_every", stream_every)
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in 1..{vocab_size} (the vocabulary) or None, "
                         f"got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def check_token_ids(input_ids, vocab_size: int):
    """Token ids are integers of the vocabulary, 0..vocab_size - 1: an integer array, or rows of
    ints. A float would be truncated to another token, and an id outside the vocabulary read as
    another one (the embedding lookup clamps: 100000 on a 512-token model reads 511, -1 reads 0).
    model.forward and model.generate both check with this. An array traced by a caller's own jit
    holds no values to check, and passes."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    if isinstance(input_ids, (np.ndarray, jax.Array)):
        if not np.issubdtype(input_ids.dtype, np.integer):
            raise ValueError(f"input_ids must hold integer token ids, got an array of "
                             f"{np.dtype(input_ids.dtype)}")
        # A jax.Array's bounds on its devices: a sharded one comes to the host only when wrong
        xp = np if isinstance(input_ids, np.ndarray) else jnp
        if input_ids.size == 0 or (int(xp.min(input_ids)) >= 0
                                   and int(xp.max(input_ids)) < vocab_size):
            return
        ids = np.asarray(input_ids)
        bad = np.argwhere((ids < 0) | (ids >= vocab_size))
        where = ", ".join(f"position {tuple(i.tolist())}" for i in bad[:3])
        raise ValueError(f"input_ids: {len(bad)} token id(s) outside the vocabulary "
                         f"0..{vocab_size - 1}, e.g. {ids[tuple(bad[0])]} at {where}")
    for b, row in enumerate(input_ids):
        for j, x in enumerate(row):
            if not is_int(x):
                raise ValueError(f"prompt row {b}, position {j}: token id {x!r} is not an "
                                 "integer")
            if not 0 <= x < vocab_size:
                raise ValueError(f"prompt row {b}, position {j}: token id {x} is outside the "
                                 f"vocabulary 0..{vocab_size - 1}")


def check_pixel_values(pixel_values):
    """pixel_values [tiles, H, W, 3], if given, hold no NaN or inf."""
    if pixel_values is not None:
        bad = ~np.isfinite(np.asarray(pixel_values, np.float32))
        if bad.any():
            tiles = sorted(set(np.nonzero(bad)[0].tolist()))
            raise ValueError(f"pixel_values hold {int(bad.sum())} NaN or infinite values "
                             f"(in tiles {tiles[:10]})")


def check_logits_finite(logits):
    """The prompt's last logits [B, V] are finite; NaN logits decode token 0 for ever."""
    bad = ~np.isfinite(np.asarray(logits, np.float32)).all(axis=-1)
    if bad.any():
        raise ValueError(f"the model's logits after the prompt are NaN or infinite (rows "
                         f"{np.nonzero(bad)[0].tolist()[:10]}): its weights hold NaN or inf "
                         "(checkpoints.load and the converter name the tensors) or its compute "
                         "overflowed")
