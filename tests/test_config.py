"""Config: presets, the derived layer pattern, and HF config.json in and out."""
import json
import re

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
    # docs/architecture.md, section 1: text parameters 107.8B (Scout) and 400.7B (Maverick); both
    # 17B active.
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


def _text(**fields):
    return {"text_config": {**SCOUT_451_TEXT, **fields}}


# Each of these gave a raw TypeError, ZeroDivisionError or a shape error deep in the model.
@pytest.mark.parametrize("patch, message", [
    (_text(hidden_size="5120"), "'hidden_size' must be an integer >= 1, got '5120'"),
    (_text(hidden_size=5120.0), "'hidden_size' must be an integer >= 1, got 5120.0"),
    (_text(num_hidden_layers="48"), "'num_hidden_layers' must be an integer >= 1, got '48'"),
    (_text(intermediate_size=-8192), "'intermediate_size': must be an integer >= 1, got -8192"),
    (_text(vocab_size=0), "'vocab_size': must be an integer >= 1, got 0"),
    (_text(num_key_value_heads=0), "'num_key_value_heads' (num_kv_heads): must be an integer >= 1"),
    (_text(num_attention_heads=0), "'num_attention_heads' must be an integer >= 1, got 0"),
    (_text(head_dim=0), "'head_dim': must be an integer >= 1, got 0"),
    (_text(num_local_experts=1.5), "'num_local_experts' (num_experts): must be an integer >= 1"),
    (_text(attention_chunk_size="8192"), "'attention_chunk_size': must be a positive integer or null"),
    (_text(rms_norm_eps=-1e-5), "'rms_norm_eps': must be a finite number > 0, got -1e-05"),
    (_text(rope_theta="big"), "'rope_theta' must be a finite number, got 'big'"),
    (_text(use_qk_norm="false"), "'use_qk_norm': must be true or false, got 'false'"),
    (_text(moe_layers="all"), "'moe_layers' must be a list, got 'all'"),
    (_text(moe_layers=[0, "1"]), "'moe_layers': must be a list of integers >= 0"),
    (_text(no_rope_layers=[1, 1, 1, "0"] * 12), "'no_rope_layers' must hold a 0 or 1 for each"),
    (_text(eos_token_id="2"), "'eos_token_id' (eos_token_ids): must be a list of integers >= 0"),
    (_text(pad_token_id=-1), "'pad_token_id': must be a token id"),
    (_text(rope_scaling=[16.0]), "'rope_scaling' must be an object, got [16.0]"),
    (_text(rope_scaling={"rope_type": "llama3", "factor": "16"}),
     "'rope_scaling.factor': must be a finite number > 0, got '16'"),
    ({"text_config": [SCOUT_451_TEXT]}, "'text_config' must be an object, got [{"),
    ({"vision_config": [1]}, "'vision_config' must be an object, got [1]"),
    ({"vision_config": {"patch_size": 0}}, "'vision_config.patch_size': must be an integer >= 1"),
    ({"vision_config": {"image_size": 300}}, "300 is not a multiple of patch_size 14"),
    ({"image_token_index": "200092"}, "'image_token_index' (image_token_id): must be an integer"),
])
def test_wrong_type_or_range_names_the_field(patch, message):
    d = {"model_type": "llama4", "text_config": SCOUT_451_TEXT, **patch}
    with pytest.raises(C.ConfigError, match=re.escape(message)) as e:
        C.from_hf(d, where="ckpt/config.json")
    assert str(e.value).startswith("ckpt/config.json")


def test_config_that_is_not_an_object():
    with pytest.raises(C.ConfigError, match="ckpt/config.json: must be a JSON object, got list"):
        C.from_hf([SCOUT_451_TEXT], where="ckpt/config.json")


def test_overrides_are_checked_like_config_json():
    with pytest.raises(C.ConfigError, match=re.escape("'num_key_value_heads' (num_kv_heads): must "
                                                      "be an integer >= 1, got 0")):
        C.tiny(num_kv_heads=0)
    with pytest.raises(C.ConfigError, match="'hidden_size': must be an integer >= 1, got 'abc'"):
        C.tiny(hidden_size="abc")


def test_float16_compute_is_refused():
    with pytest.raises(C.ConfigError, match="float16 overflows to NaN on real weights; use bfloat16"):
        C.tiny().replace(dtype="float16")
    assert C.tiny().replace(dtype="bfloat16", param_dtype="float16").dtype == "bfloat16"


def test_unknown_preset():
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.preset("llama5")
