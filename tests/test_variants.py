"""The ablations' modelling variants (config fields whose defaults are Llama 4's): what each
computes, the parameters it drops, that HF config output refuses them, and that a training
checkpoint records them."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import config as C
from model.kernels import experts as X
from model.layers import MLP
from model.moe import MoE
from checkpoints.runs import config_from_meta, model_record


def _one_expert_layer(**variant):
    """One expert, one token, weights large enough that SwiGLU's curvature shows."""
    cfg = model.tiny(num_experts=1, vocab_size=8, hidden_size=4, intermediate_size=4, **variant)
    p = jax.tree.map(lambda a: a[0] * 30, model.init_params(cfg, jax.random.key(2))
                     ["blocks"]["layer_0"]["moe"])
    return cfg, p, jnp.ones((1, 1, 4))


def _expert(p, x):  # expert 0 of the layer on rows x [M, D]
    return X.swiglu_ragged(x, p["wi_gate"], p["wi_up"], p["wo"], jnp.array([x.shape[0]]))


def test_score_on_the_output_scales_the_expert_output():
    cfg, p, x = _one_expert_layer(router_score="output")
    s = jax.nn.sigmoid(x[0] @ p["router"])
    shared = MLP(cfg, cfg.text.intermediate_size).apply({"params": p["shared"]}, x)
    routed = MoE(cfg).apply({"params": p}, x) - shared
    np.testing.assert_allclose(routed[0], s * _expert(p, x[0]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(routed[0], _expert(p, s * x[0]), rtol=1e-3)


def test_softmax_router_scores_by_the_probability_over_all_experts():
    cfg = model.tiny(router_activation="softmax", experts_per_token=2, shared_expert=False)
    p = jax.tree.map(lambda a: a[0] * 20, model.init_params(cfg, jax.random.key(0))
                     ["blocks"]["layer_0"]["moe"])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 32)), jnp.float32)
    probs = jax.nn.softmax(x[0] @ p["router"], axis=-1)                       # [T, E]
    top = jnp.argsort(-probs, axis=-1)[:, :2]
    expected = sum(X.dense(x[0] * jnp.take_along_axis(probs, top[:, j:j + 1], -1), top[:, j],
                           p["wi_gate"], p["wi_up"], p["wo"]) for j in range(2))
    np.testing.assert_allclose(MoE(cfg).apply({"params": p}, x)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(router_score="output", experts_per_token=2),
                                     dict(router_activation="softmax", shared_expert=False)])
def test_every_kernel_gives_the_variant_of_the_reference(variant):
    cfg = model.tiny(**variant)
    p = jax.tree.map(lambda a: a[0] * 20, model.init_params(cfg, jax.random.key(0))
                     ["blocks"]["layer_0"]["moe"])
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 32)), jnp.float32)
    ref = MoE(cfg, model.Runtime(experts="dense")).apply({"params": p}, x)
    for kernel in ("ragged", "rounds"):
        np.testing.assert_allclose(MoE(cfg, model.Runtime(experts=kernel)).apply({"params": p}, x),
                                   ref, rtol=1e-5, atol=1e-5)


def test_no_shared_expert_drops_its_parameters_only():
    cfg = model.tiny(shared_expert=False)
    moe = model.param_shapes(cfg)["blocks"]["layer_0"]["moe"]
    assert set(moe) == {"router", *X.EXPERT_WEIGHTS}
    with_shared = model.param_shapes(model.tiny())["blocks"]["layer_0"]["moe"]
    assert set(with_shared) - set(moe) == {"shared"}
    n = sum(math.prod(a.shape) for k in model.DECODER_KEYS
            for a in jax.tree.leaves(model.param_shapes(cfg)[k]))
    assert n == C.param_count(cfg)["text"]
    logits = model.forward(cfg, model.init_params(cfg, jax.random.key(0)), [[1, 2, 3]])
    assert logits.shape == (1, 3, 128) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("field, value", [("router_score", "output"),
                                          ("router_activation", "softmax"),
                                          ("shared_expert", False)])
def test_hf_config_refuses_a_variant(field, value):
    cfg = model.tiny(**{field: value})
    with pytest.raises(C.ConfigError, match=f"{field}={value!r}: an ablation variant"):
        C.to_hf(cfg)
    llama4, variant = C.split_variant(cfg)
    assert variant == {field: value} and llama4 == model.tiny()
    assert C.from_hf(C.to_hf(llama4)) == llama4


def test_a_training_checkpoint_records_the_variant():
    cfg = model.tiny(router_score="output", shared_expert=False)
    meta = json.loads(json.dumps(model_record(cfg)))
    assert meta["variant"] == {"router_score": "output", "shared_expert": False}
    assert config_from_meta(meta) == cfg
    assert "variant" not in model_record(model.tiny())  # Llama 4's records are as before


@pytest.mark.parametrize("field, value, message", [
    ("router_score", "both", "'router_score': 'both' is not one of ['input', 'output']"),
    ("router_activation", "relu", "'router_activation': 'relu' is not one of"),
    ("shared_expert", 0, "'shared_expert': must be true or false, got 0"),
])
def test_bad_variant_value_is_one_clear_error(field, value, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.tiny(**{field: value})
