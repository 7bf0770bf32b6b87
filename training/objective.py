"""The SFT objective (masked next-token cross-entropy plus the router load-balancing loss), and
the pieces every objective shares: the decoder call, token log-probs, the router loss.

Load-balancing loss (one value per MoE layer, averaged over layers, times router_aux_loss_coef):

    aux = E * sum_e f_e * P_e

- f_e: the fraction of (token, top-k slot) assignments that went to expert e (sums to 1; a count,
  so it carries no gradient).
- P_e: the mean over tokens of expert e's *normalised sigmoid* affinity, sigmoid(z_e) / sum_e'
  sigmoid(z_e'). Llama 4 routes by sigmoid, not softmax, so this is the Switch Transformer loss
  with DeepSeek-V3's normalised sigmoid affinities in place of softmax probabilities (taken over
  the whole batch rather than per sequence).
aux equals 1 when routing is uniform and E when every token goes to one expert. Only real tokens
(not padding) enter f and P. Meta has not published the loss it trained Llama 4 with; HF computes
none for Llama 4 (router_aux_loss_coef is unused there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model import DECODER_KEYS, Runtime
from model.config import Config
from model.decoder import Decoder


def router_logits(intermediates) -> jax.Array:
    """The sown router logits of every MoE layer, in layer order: [L_moe, B*T, E]."""
    blocks = intermediates["blocks"]
    per_slot = [blocks[name]["moe"]["router_logits"][0]  # [num_blocks, B*T, E]
                for name in sorted(blocks, key=lambda n: int(n.split("_")[1]))
                if "moe" in blocks[name]]
    # Layer index = block * period + slot: interleave the slots back into depth order.
    return jnp.stack(per_slot, axis=1).reshape(-1, *per_slot[0].shape[1:])


def load_balancing(logits, k: int, mask):
    """logits [L, T, E], mask [T] -> (aux [] (mean over layers), load f [L, E])."""
    E = logits.shape[-1]
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    _, top = jax.lax.top_k(logits, k)                                  # [L, T, k]
    counts = jax.nn.one_hot(top, E, dtype=jnp.float32).sum(-2)         # [L, T, E]
    f = jnp.einsum("LTE,T->LE", counts, m) / (k * n)
    s = jax.nn.sigmoid(logits.astype(jnp.float32))
    P = jnp.einsum("LTE,T->LE", s / s.sum(-1, keepdims=True), m) / n
    return jnp.mean(E * jnp.sum(jax.lax.stop_gradient(f) * P, -1)), f


def decode(cfg: Config, rt: Runtime, params, inputs):
    """inputs [B, T] -> (logits [B, T, V] fp32, the sown intermediates): the decoder as every
    objective runs it (`rt` a training runtime, model.resolve(cfg, "train", ...))."""
    dec = {k: params[k] for k in DECODER_KEYS}
    (logits, _), state = Decoder(cfg, rt).apply({"params": dec}, inputs,
                                                mutable=["intermediates"])
    return logits, state.get("intermediates", {})  # only MoE layers sow (their router logits)


def token_logprobs(logits, targets):
    """log p(target) [B, T] from logits [B, T, V] and targets [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def cross_entropy(logits, targets, weights):
    """Weighted mean of -log p(target): logits [B, T, V] fp32, targets/weights [B, T]."""
    nll = -token_logprobs(logits, targets)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def add_router_loss(cfg: Config, loss, metrics: dict, intermediates, real):
    """loss + router_aux_loss_coef * the load-balancing loss over the real tokens real [B, T]
    (those the model read); metrics gain "aux", "load" and "loss". Dense models: loss as is."""
    if cfg.text.moe_layers:
        aux, load = load_balancing(router_logits(intermediates), cfg.text.experts_per_token,
                                   real.reshape(-1))
        loss = loss + cfg.text.router_aux_loss_coef * aux
        metrics = metrics | {"aux": aux, "load": load}
    return loss, metrics | {"loss": loss}


def loss_fn(cfg: Config, rt: Runtime, params, batch):
    """batch: tokens [B, T+1], weights [B, T+1] (as targets), real [B, T+1]; `rt` a training
    runtime (model.resolve(cfg, "train", ...)). Returns (total loss, metrics dict)."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = batch["weights"][:, 1:].astype(jnp.float32)
    logits, intermediates = decode(cfg, rt, params, inputs)
    ce = cross_entropy(logits, targets, weights)
    return add_router_loss(cfg, ce, {"ce": ce, "targets": jnp.sum(weights)}, intermediates,
                           batch["real"][:, :-1])
