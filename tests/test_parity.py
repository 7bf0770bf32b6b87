"""Parity with HF transformers on tiny random models (fp32): modules within 1e-5, whole-model
logits within 1e-4 relative, for several layer patterns and feature switches.

Sequences are several chunks long (chunk 8, T = 37) and floor_scale is 4, so temperature tuning
changes value inside every sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import checkpoints
import model
from experiments.hf_reference import hf_text_model, params_from_hf
from model.attention import Attention
from model.layers import MLP, RMSNorm, rms_normalize
from model.moe import MoE
from model.rope import inv_frequencies, rotate
from tests.hf_models import TEXT, make_hf_multimodal_model, text

SCALED_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0,
                   high_freq_factor=1.0, original_max_position_embeddings=16)
VARIANTS = {
    "scout_like": dict(rope_parameters=SCALED_ROPE),
    "maverick_like": dict(interleave_moe_layer_step=2, use_qk_norm=False),
    "old_llama3_scaling": dict(rope_parameters={**SCALED_ROPE, "factor": 8.0, "high_freq_factor": 4.0}),
    "six_layers_top2": dict(num_hidden_layers=6, num_experts_per_tok=2),
    "no_chunking_no_tuning": dict(attention_chunk_size=None, attn_temperature_tuning=False),
}


def relative_error(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    hf = hf_text_model(text(**VARIANTS[request.param]), seed=3)
    cfg, params = params_from_hf(hf)
    return hf, cfg, params


def test_whole_model_logits(pair):
    hf, cfg, params = pair
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (3, 37))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    for experts in (None, "dense"):  # the runtime's kernel, and the reference
        assert relative_error(model.forward(cfg, params, ids, experts=experts), ref) < 1e-4


def test_orbax_and_hf_dir_give_the_same_logits(tmp_path):
    hf = hf_text_model(text(**VARIANTS["scout_like"]), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    checkpoints.hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
    ids = np.random.default_rng(1).integers(0, TEXT["vocab_size"], (2, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    for src in ("hf", "orbax"):
        cfg, params = checkpoints.load(tmp_path / src)
        assert relative_error(model.forward(cfg, params, ids), ref) < 1e-4


def test_text_part_of_conditional_generation(tmp_path):
    path, hf = make_hf_multimodal_model(tmp_path, seed=5)
    cfg, params = checkpoints.load(path)
    ids = np.random.default_rng(2).integers(0, TEXT["vocab_size"], (2, 29))
    with torch.no_grad():
        ref = hf.language_model(input_ids=torch.tensor(ids)).logits
    assert relative_error(model.forward(cfg, params, ids), ref.numpy()) < 1e-4


# ---- modules, 1e-5 ----------------------------------------------------------------------------

def _layer(params, i, cfg):
    """Layer i's parameters (unstacked from the scanned block)."""
    t = cfg.text
    return jax.tree.map(lambda a: a[i // t.period], params["blocks"][f"layer_{i % t.period}"])


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_rms_norms(pair):
    hf, cfg, params = pair
    x = _x((2, 5, TEXT["hidden_size"]))
    norm = hf.model.layers[0].input_layernorm
    ours = RMSNorm(cfg, cfg.text.rms_norm_eps).apply(
        {"params": _layer(params, 0, cfg)["attn_norm"]}, jnp.asarray(x))
    np.testing.assert_allclose(ours, norm(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm
    q = _x((2, 5, 4, 8))
    np.testing.assert_allclose(rms_normalize(jnp.asarray(q), 1e-5),
                               Llama4TextL2Norm(1e-5)(torch.tensor(q)).numpy(), rtol=1e-5, atol=1e-5)


def test_rope(pair):
    hf, cfg, _ = pair
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb
    q, k = _x((2, 37, 4, 8)), _x((2, 37, 2, 8), 1)
    pos = np.broadcast_to(np.arange(37), (2, 37))
    freqs = hf.model.rotary_emb(torch.tensor(q), torch.tensor(pos))
    ref_q, ref_k = apply_rotary_emb(torch.tensor(q), torch.tensor(k), freqs)
    inv = inv_frequencies(cfg.text.head_dim, cfg.text.rope_theta, cfg.text.rope_scaling)
    np.testing.assert_allclose(inv, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rotate(jnp.asarray(q), pos, inv), ref_q.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rotate(jnp.asarray(k), pos, inv), ref_k.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("i", [0, 3])  # a RoPE + chunked layer and a NoPE + global layer
def test_attention_layer(pair, i):
    hf, cfg, params = pair
    T = 37
    x = _x((2, T, TEXT["hidden_size"]))
    pos = np.broadcast_to(np.arange(T), (2, T))
    spec = cfg.text.layer_specs[i]
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = k <= q
    if spec.chunked:
        allowed &= k // cfg.text.attention_chunk_size == q // cfg.text.attention_chunk_size
    mask = torch.tensor(np.where(allowed, 0.0, -np.inf), dtype=torch.float32)[None, None]
    with torch.no_grad():
        freqs = hf.model.rotary_emb(torch.tensor(x), torch.tensor(pos))
        ref = hf.model.layers[i].self_attn(torch.tensor(x), freqs, mask)[0].numpy()
    ours, _ = Attention(cfg, spec).apply({"params": _layer(params, i, cfg)["attn"]},
                                         jnp.asarray(x), jnp.asarray(pos))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_moe_and_mlp(pair):
    hf, cfg, params = pair
    x = _x((2, 11, TEXT["hidden_size"]))
    for i, spec in enumerate(cfg.text.layer_specs[:2]):
        ffn = hf.model.layers[i].feed_forward
        with torch.no_grad():
            ref = ffn(torch.tensor(x))
        ref = (ref[0] if spec.moe else ref).reshape(x.shape).numpy()
        p = _layer(params, i, cfg)
        if spec.moe:
            for experts in ("rounds", "ragged", "dense"):
                ours = MoE(cfg, model.Runtime(experts=experts)).apply({"params": p["moe"]},
                                                                      jnp.asarray(x))
                np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        else:
            ours = MLP(cfg, cfg.text.intermediate_size_mlp).apply({"params": p["mlp"]}, jnp.asarray(x))
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
