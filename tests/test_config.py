"""Config: presets, the derived layer pattern, and HF config.json in and out."""
import json

import pytest

from model import config as C


def test_scout_pattern():
    specs = C.preset("scout").text.layer_specs
    assert [i for i, s in enumerate(specs) if not s.rope] == list(range(3, 48, 4))
    assert all(s.moe for s in specs)
    assert all(s.chunked == s.rope for s in specs)
    assert C.preset("scout").text.period == 4 and C.preset("scout").text.num_blocks == 12


def test_maverick_pattern():
    t = C.preset("maverick").text
    assert [i for i, s in enumerate(t.layer_specs) if s.moe] == list(range(1, 48, 2))
    assert t.period == 4 and not t.use_qk_norm and t.rope_scaling is None


def test_period_falls_back_to_depth_when_pattern_does_not_repeat():
    t = C.tiny(num_layers=5, nope_layers=(3,), moe_layers=(0, 1, 2, 3, 4)).text
    assert t.period == 5 and t.num_blocks == 1
    t = C.tiny(num_layers=8, nope_layers=(3, 7), moe_layers=(1, 3, 5, 7)).text
    assert t.period == 4 and t.num_blocks == 2


def test_published_param_counts_from_config():
    # LLAMA4.md: text parameters 107.8B (Scout) and 400.7B (Maverick); both 17B active.
    scout, maverick = C.param_count(C.SCOUT), C.param_count(C.MAVERICK)
    assert abs(scout["text"] / 107.8e9 - 1) < 0.01
    assert abs(maverick["text"] / 400.7e9 - 1) < 0.01
    assert abs(scout["text_active"] / 17e9 - 1) < 0.03
    assert abs(maverick["text_active"] / 17e9 - 1) < 0.03
    behemoth = C.param_count(C.BEHEMOTH)
    assert abs(behemoth["text_active"] / 288e9 - 1) < 0.01
    assert 1.9e12 < behemoth["text"] < 2.2e12


SCOUT_451_TEXT = {  # the 4.51-era published Scout text_config, abridged to its non-default fields
    "model_type": "llama4_text", "attention_chunk_size": 8192, "attn_temperature_tuning": 4,
    "attn_scale": 0.1, "floor_scale": 8192, "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018, "for_llm_compressor": False,
    "head_dim": 128, "hidden_size": 5120, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "interleave_moe_layer_step": 1,
    "max_position_embeddings": 10485760, "moe_layers": None, "no_rope_layers": [],
    "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
    "num_key_value_heads": 8, "num_local_experts": 16, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "torch_dtype": "bfloat16", "use_qk_norm": True, "vocab_size": 202048,
    "router_jitter_noise": 0.0, "use_cache": True, "output_router_logits": False,
}


def test_legacy_scout_config_loads_as_the_preset():
    cfg = C.from_hf({"model_type": "llama4", "text_config": SCOUT_451_TEXT,
                     "vision_config": {"image_size": 336, "hidden_size": 1408,
                                       "vision_output_dim": 4096, "rope_theta": 10000}})
    assert cfg.text.attn_temperature_tuning is True  # the legacy `4`
    assert cfg.text == C.SCOUT.text
    assert cfg.vision == C.SCOUT.vision


@pytest.mark.parametrize("cfg", [C.SCOUT, C.MAVERICK, C.tiny(), C.tiny(attention_chunk_size=None),
                                 C.tiny().replace_text(eos_token_ids=())])  # eos_token_id: null
def test_hf_round_trip(cfg):
    d = json.loads(json.dumps(C.to_hf(cfg)))
    assert C.from_hf(d) == cfg


def test_eos_token_id_null_means_no_stop_token():
    d = C.to_hf(C.tiny())
    d["eos_token_id"] = None
    assert C.from_hf(d).text.eos_token_ids == ()
    assert C.to_hf(C.from_hf(d))["eos_token_id"] is None


def test_transformers_reads_what_we_write():
    transformers = pytest.importorskip("transformers")
    d = C.to_hf(C.MAVERICK)
    hf = transformers.Llama4Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert hf.text_config.moe_layers == list(range(1, 48, 2))
    assert hf.text_config.no_rope_layers == [int((i + 1) % 4 != 0) for i in range(48)]
    assert C.from_hf(hf.to_dict()) == C.MAVERICK


@pytest.mark.parametrize("patch, message", [
    ({"text_config": {**SCOUT_451_TEXT, "mystery_knob": 3}}, "mystery_knob"),
    ({"text_config": {**SCOUT_451_TEXT, "hidden_act": "gelu"}}, "hidden_act"),
    ({"text_config": {**SCOUT_451_TEXT, "num_key_value_heads": 7}}, "num_attention_heads"),
    ({"text_config": {**SCOUT_451_TEXT, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, "yarn"),
    ({"text_config": {**SCOUT_451_TEXT, "layer_types": ["full_attention"] * 48}}, "layer_types"),
    ({"text_config": {**SCOUT_451_TEXT, "moe_layers": [0, 48]}}, "moe_layers"),
    ({"text_config": {**SCOUT_451_TEXT, "no_rope_layers": [1, 0]}}, "no_rope_layers"),
    ({"model_type": "llama"}, "model_type"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_bad_config_is_one_clear_error(patch, message):
    d = {"model_type": "llama4", "text_config": SCOUT_451_TEXT, **patch}
    with pytest.raises(C.ConfigError, match=message):
        C.from_hf(d)


def test_unknown_preset():
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.preset("llama5")
