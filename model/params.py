"""The parameter tree, declared once by the modules: its shapes, logical axes and random init.

Every other statement of the tree derives from here: the checkpoint key table's shapes
(checkpoints/keys.py), the sharding rules' per-leaf specs (sharding/rules.py), the training
state. The tree is the stored one (a public format: Orbax checkpoints hold its names): the
decoder's layers under "blocks", stacked over `cfg.text.num_blocks`; with a vision tower
(cfg.vision not None) also "vision" and "projector".
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import Config
from .decoder import Decoder
from .layers import INIT_STD, NORMAL, noting_initializers
from .vision import VisionTower


def _dummy_tile(cfg: Config):
    v = cfg.vision
    return jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.dtype(cfg.dtype))


def _boxed(cfg: Config):
    """The declared variables, abstract, with their logical-axis metadata."""
    def init(key):
        params = Decoder(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        if cfg.vision is not None:
            params = {**params, **VisionTower(cfg).init(key, _dummy_tile(cfg))["params"]}
        return params
    return jax.eval_shape(init, jax.random.key(0))


@functools.lru_cache(maxsize=32)
def _declared(cfg: Config):
    """(shapes, axes, initializers) of every leaf, by tracing the modules once per config."""
    with noting_initializers() as noted:
        boxed = _boxed(cfg)
    return nn.unbox(boxed), nn.get_partition_spec(boxed), dict(noted)


def param_shapes(cfg: Config):
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return _copy(_declared(cfg)[0])


def param_axes(cfg: Config):
    """The logical axis names of every parameter (a pytree of PartitionSpecs over logical names)."""
    return _copy(_declared(cfg)[1])


def _copy(tree):  # a fresh copy of the nested dicts, for callers free to change it
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def init_params(cfg: Config, key: jax.Array):
    """Random parameters as a plain pytree, each drawn from the initializer its module declares
    (`layers.param`: normal with std 0.02 for weights, ones for norm scales, zeros for biases).

    The modules are traced only abstractly, noting each parameter's initializer: initialising
    through them under jit would compile their forward pass (seconds on a CPU), and a random
    draw per leaf would compile dozens of generators. The normal leaves are cut from one draw."""
    shapes, _, noted = _declared(cfg)
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
