"""Full-size presets, checked without memory: shapes only, through `jax.eval_shape`."""
import math

import jax
import pytest

import model
from model import config as C


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, published", [("scout", 107.8e9), ("maverick", 400.7e9)])
def test_full_preset_parameter_count(name, published):
    cfg = C.preset(name)
    shapes = model.param_shapes(cfg)  # abstract: nothing is allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    n = _count({k: shapes[k] for k in model.DECODER_KEYS})  # the text model (vision: test_vision)
    assert abs(n / published - 1) < 0.01, n
    assert n == C.param_count(cfg)["text"]


def test_scout_shapes_match_the_published_checkpoint():
    blocks = model.param_shapes(C.SCOUT)["blocks"]
    layer = blocks["layer_0"]
    assert layer["attn"]["q"].shape == (12, 5120, 40, 128)
    assert layer["attn"]["k"].shape == (12, 5120, 8, 128)
    assert layer["moe"]["wi_gate"].shape == (12, 16, 5120, 8192)
    assert layer["moe"]["wo"].shape == (12, 16, 8192, 5120)
    assert layer["moe"]["shared"]["wi_up"].shape == (12, 5120, 8192)


def test_maverick_interleaves_dense_and_moe_layers():
    blocks = model.param_shapes(C.MAVERICK)["blocks"]
    assert set(blocks["layer_0"]) == {"attn_norm", "attn", "ffn_norm", "mlp"}
    assert blocks["layer_0"]["mlp"]["wi_gate"].shape == (12, 5120, 16384)
    assert blocks["layer_1"]["moe"]["wi_gate"].shape == (12, 128, 5120, 8192)


def test_every_parameter_has_logical_axes():
    axes = model.param_axes(C.SCOUT)
    shapes = model.param_shapes(C.SCOUT)
    for spec, shape in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape) and all(a is not None for a in spec)
