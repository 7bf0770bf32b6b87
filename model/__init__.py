"""Llama 4 in JAX/Flax: Scout (16 experts), Maverick (128 experts) and the Behemoth shape.

Dimension letters (einsum strings, shape comments, names):
  B batch, T query length, S key length, D model width, F FFN width, N query heads, K KV heads,
  G query heads per KV head, H head dim, E experts, V vocab, L layers, C chunk, P patches.

Llama 4's quirks, each a trap for a port:
- iRoPE: every 4th layer has no positional encoding and attends over the whole context; the other
  layers use RoPE and attend only within 8192-token chunks.
- RoPE rotates *adjacent* pairs (2i, 2i+1) of each head, with no NeoX permutation of q/k rows;
  Scout scales the frequencies llama3-style (factor 16, low == high frequency factor after Meta's
  fix), Maverick does not.
- Scout normalises q and k per head with a weightless RMS norm on RoPE layers only (after RoPE).
- NoPE layers multiply q by 1 + 0.1 * log(1 + floor((p + 1) / 8192)) ("temperature tuning").
- MoE: sigmoid of the top-1 router logit (no softmax), and that score multiplies the routed
  expert's *input*, not its output; an always-on shared expert sees the unscaled input. Maverick
  interleaves MoE and dense layers (MoE on odd layers).
- The LM head is untied; no logit soft-capping; no embedding multiplier.
- Vision: the class token is appended *last*; 2-D RoPE counts patch rows and columns from 1;
  the adapter applies GELU after both of its layers; image features replace the embeddings of
  `<|patch|>` tokens (200092), not of `<|image|>`.

Parameters are a plain pytree, declared once by the modules (model/params.py; checkpoints/keys.py
has the HF correspondence): the layers live under "blocks", stacked over `cfg.text.num_blocks`
repeats of the `cfg.text.period`-layer pattern. How a call runs the model (parameter views,
attention and expert kernels, sharding) is one `Runtime`, chosen by `runtime.resolve`; the
modules say what is computed, model/kernels/ how.

    logits = model.forward(cfg, params, input_ids)                       # [B, T, V]
    ids = model.generate(cfg, params, input_ids, max_new_tokens=32)      # [B, T + 32]
    tok = model.tokenizer.Tokenizer.load(checkpoint_dir)                 # text <-> ids, chat format
    ids, pixels = model.image_processing.build_inputs([before, image, after], cfg, tokens)

The facts behind each quirk, with their sources (Meta's model card and reference code, HF's
implementation): docs/architecture.md.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import image_processing, inputs, multimodal, runtime, tokenizer
from .config import Config, ConfigError, LayerSpec, TextConfig, VisionConfig, preset, tiny
from .decoder import Decoder
from .multimodal import DECODER_KEYS, VISION_KEYS
from .params import init_params, param_axes, param_shapes
from .runtime import Runtime, resolve
from .sampling import generate


@functools.partial(jax.jit, static_argnames=("cfg", "rt"))
def _forward(cfg: Config, rt: Runtime, params, input_ids, pixel_values):
    embed_fn = None
    if pixel_values is not None:
        feats = multimodal.image_features(cfg, params, pixel_values)
        embed_fn = functools.partial(multimodal.splice, input_ids=input_ids, features=feats,
                                     image_token_id=cfg.image_token_id)
    return Decoder(cfg, rt).apply({"params": multimodal.decoder_params(params)}, input_ids,
                                  embed_fn=embed_fn)[0]


def forward(cfg: Config, params, input_ids, pixel_values=None, *, mesh=None, rules="combined",
            experts: str | None = None, layout: str | None = None):
    """Logits [B, T, V] (fp32) for input_ids [B, T].

    pixel_values [tiles, S, S, 3] (channel-last, normalised: see `model.image_processing`) are
    encoded and their features replace the embeddings at the <|patch|> positions, in order.
    With a `mesh` (sharding.make_mesh) the model runs sharded by the strategy `rules` (see
    sharding/); params are placed first unless `sharding.shard_params` already placed them.
    `experts` / `layout` override the runtime's choice (e.g. experts="dense": the reference MoE)."""
    if not isinstance(input_ids, jax.Array):
        input_ids = np.asarray(input_ids)  # not yet jnp: that would wrap int64 ids to int32
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    inputs.check_token_ids(input_ids, cfg.text.vocab_size)
    input_ids = jnp.asarray(input_ids)
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
        multimodal.check_pixel_values(cfg, pixel_values)
    multimodal.check_image_tokens(cfg, input_ids, pixel_values)
    placement, params = runtime.place(cfg, params, *input_ids.shape, mesh, rules)
    rt = resolve(cfg, "prefill", placement, experts=experts, layout=layout)
    if placement is not None:
        input_ids = placement.put(input_ids, ("batch", "seq"), "input_ids")
        if pixel_values is not None:
            pixel_values = placement.put(pixel_values, (None,) * 4, "pixel_values")
    return _forward(cfg, rt, rt.view_params(params), input_ids, pixel_values)


__all__ = ["Config", "ConfigError", "DECODER_KEYS", "LayerSpec", "Runtime", "TextConfig",
           "VISION_KEYS", "VisionConfig", "forward", "generate", "init_params", "param_axes",
           "param_shapes", "preset", "resolve", "tiny"]
