"""model.init_params: each leaf drawn from the initializer its module declares, with no compiled
forward pass (the modules are traced abstractly and their initializers noted)."""
import jax
import numpy as np
import pytest

import model
from model import layers
from tests.hf_models import multimodal_config


def _vision_config():
    return multimodal_config(num_hidden_layers=1)


def test_each_leaf_follows_its_declared_initializer():
    params = model.init_params(_vision_config(), jax.random.key(0))
    flat = {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert jax.tree.structure(params) == jax.tree.structure(model.param_shapes(_vision_config()))
    for name, v in flat.items():
        last = name.split("/")[-1]
        if last == "scale":
            assert (v == 1).all(), name
        elif last == "bias" or last.endswith("_bias"):
            assert (v == 0).all(), name
        else:
            assert abs(v.std() - layers.INIT_STD) < 0.3 * layers.INIT_STD, name
    # Leaves are independent draws, and the key matters.
    q, o = flat["blocks/layer_0/attn/q"].ravel(), flat["blocks/layer_0/attn/o"].ravel()
    assert not np.allclose(q[:64], o[:64])
    other = model.init_params(_vision_config(), jax.random.key(1))
    assert not np.allclose(other["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_an_initializer_without_a_draw_is_an_error(monkeypatch):
    monkeypatch.setattr(model.params, "_KINDS", {layers.NORMAL: "normal"})  # ones unknown: norm scales
    with pytest.raises(ValueError, match="scale: no draw for its initializer"):
        model.init_params(model.tiny(), jax.random.key(0))
