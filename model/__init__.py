"""Llama 4 in JAX/Flax: Scout (16 experts), Maverick (128 experts) and the Behemoth shape.

Dimension letters (einsum strings, shape comments, names):
  B batch, T query length, S key length, D model width, F FFN width, N query heads, K KV heads,
  G query heads per KV head, H head dim, E experts, V vocab, L layers, C chunk, P patches.

Llama 4's quirks, each a trap for a port (LLAMA4.md has the sources):
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

Parameters are a plain pytree (see checkpoints/keys.py for the HF correspondence); the layers live
under "blocks", stacked over `cfg.text.num_blocks` repeats of the `cfg.text.period`-layer pattern.
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import Config, ConfigError, LayerSpec, TextConfig, VisionConfig, preset, tiny
from .decoder import Decoder
from .layers import INIT_STD, NORMAL, noting_initializers, place_on_mesh, sharding_plan
from .sampling import generate
from .split import for_inference
from . import multimodal
from .multimodal import DECODER_KEYS, VISION_KEYS
from .vision import VisionTower


def _dummy_tile(cfg: Config):
    v = cfg.vision
    return jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.dtype(cfg.dtype))


def init_params(cfg: Config, key: jax.Array):
    """Random parameters as a plain pytree, each drawn from the initializer its module declares
    (`layers.param`: normal with std 0.02 for weights, ones for norm scales, zeros for biases);
    with a vision tower (cfg.vision not None) it also holds "vision" and "projector".

    The modules are traced only abstractly, noting each parameter's initializer: initialising
    through them under jit would compile their forward pass (seconds on a CPU), and a random
    draw per leaf would compile dozens of generators. The normal leaves are cut from one draw."""
    with noting_initializers() as noted:
        shapes = param_shapes(cfg)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    spec = []
    for path, s in leaves:
        init = noted[tuple(k.key for k in path)]
        if init not in _KINDS:
            raise ValueError(f"parameter {'/'.join(k.key for k in path)}: no draw for its "
                             f"initializer {init}")
        spec.append((s.shape, s.dtype, _KINDS[init]))
    return _draw(tree, tuple(spec), key)


_KINDS = {NORMAL: "normal", nn.initializers.ones: "ones", nn.initializers.zeros: "zeros"}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draw(tree, spec, key):
    """spec: (shape, dtype, kind) per leaf. Every leaf owns a slice of one normal draw, used
    only by the normal ones, so that adding a leaf of another kind leaves the others' values."""
    offsets = [0, *itertools.accumulate(math.prod(shape) for shape, _, _ in spec)]
    flat = INIT_STD * jax.random.normal(key, (offsets[-1],), jnp.float32)
    values = [flat[a:b].reshape(shape).astype(dtype) if kind == "normal"
              else jnp.full(shape, 1 if kind == "ones" else 0, dtype)
              for (shape, dtype, kind), a, b in zip(spec, offsets, offsets[1:])]
    return jax.tree_util.tree_unflatten(tree, values)


def param_shapes(cfg: Config):
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    def init(key):
        ids = jnp.zeros((1, 1), jnp.int32)
        params = nn.unbox(Decoder(cfg).init(key, ids)["params"])
        if cfg.vision is not None:
            params = {**params, **nn.unbox(VisionTower(cfg).init(key, _dummy_tile(cfg))["params"])}
        return params
    return jax.eval_shape(init, jax.random.key(0))


def param_axes(cfg: Config):
    """The logical axis names of every parameter (a pytree of PartitionSpecs over logical names)."""
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    axes = nn.get_partition_spec(boxed)["params"]
    if cfg.vision is not None:
        boxed = jax.eval_shape(lambda: VisionTower(cfg).init(jax.random.key(0), _dummy_tile(cfg)))
        axes = {**axes, **nn.get_partition_spec(boxed)["params"]}
    return axes


@functools.partial(jax.jit, static_argnames=("cfg", "moe_impl", "plan", "layout"))
def _forward(cfg: Config, params, input_ids, moe_impl: str, plan=None, layout="stacked"):
    with sharding_plan(plan):
        return Decoder(cfg, moe_impl, layout=layout).apply(
            {"params": multimodal.decoder_params(params)}, input_ids)[0]


def forward(cfg: Config, params, input_ids, pixel_values=None, *, moe_impl: str = "grouped",
            mesh=None, rules="combined"):
    """Logits [B, T, V] (fp32) for input_ids [B, T]; `moe_impl="dense"` runs the reference MoE.

    pixel_values [tiles, S, S, 3] (channel-last, normalised: see `model.image_processing`) are
    encoded and their features replace the embeddings at the <|patch|> positions, in order.
    With a `mesh` (sharding.make_mesh) the model runs sharded by the strategy `rules` (see
    sharding/); params are placed first unless `sharding.shard_params` already placed them."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if pixel_values is not None:
        return multimodal.forward(cfg, params, input_ids, pixel_values, moe_impl, mesh, rules)
    multimodal.check_image_tokens(cfg, input_ids, None)
    plan, params = place_on_mesh(cfg, params, input_ids.shape[0], mesh, rules)
    if plan is not None:
        input_ids = plan.put(input_ids, ("batch", "seq"), "input_ids")
    layout, params = for_inference(cfg, params, plan, "blocks")
    return _forward(cfg, params, input_ids, moe_impl, plan, layout)


__all__ = ["Config", "ConfigError", "LayerSpec", "TextConfig", "VisionConfig", "forward",
           "generate", "init_params", "param_axes", "param_shapes", "preset", "tiny"]
