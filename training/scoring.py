"""Scoring token sequences with a model that is not being trained: a DPO reference (once, before
training), the policy that sampled a GRPO rollout and GRPO's reference (once per rollout), the
judge of experiments/filter_easy.py. Batched in fixed-size pieces (one compiled program),
on one device or split over a mesh, with the training runtime, so that a frozen copy of the
policy scores exactly what the train step computes for it.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

import model
from model import Runtime
from model.config import Config

from .objective import decode, token_logprobs


@functools.partial(jax.jit, static_argnames=("cfg", "rt"))
def target_logprobs(cfg: Config, rt: Runtime, params, tokens):
    """log p(tokens[:, 1:]) [B, T] for tokens [B, T + 1]."""
    logits, _ = decode(cfg, rt, params, tokens[:, :-1])
    return token_logprobs(logits, tokens[:, 1:])


def score_tokens(cfg: Config, params, tokens: np.ndarray, batch: int, mesh=None,
                 rules="combined") -> np.ndarray:
    """log p(tokens[:, 1:]) [R, T] (numpy, fp32) for tokens [R, T + 1], `batch` rows at a time
    (the last piece padded with copies of its first row, so one program serves every piece).
    With a `mesh` the model runs split over it (params placed there unless already)."""
    placement, params = model.runtime.place(cfg, params, batch, tokens.shape[1] - 1, mesh, rules)
    rt = model.resolve(cfg, "train", placement)
    out = []
    for s in range(0, len(tokens), batch):
        piece = tokens[s:s + batch]
        n = len(piece)
        piece = np.concatenate([piece, np.repeat(piece[:1], batch - n, axis=0)])
        if placement is not None:
            piece = placement.put(piece, ("batch", "seq"))
        out.append(np.asarray(target_logprobs(cfg, rt, params, piece))[:n])
    return np.concatenate(out).astype(np.float32)
