"""The tiny model configs of the tests, stated once, and the random HF models built from them.

    path, hf = make_hf_text_model(tmp_path, num_hidden_layers=6)      # Llama4ForCausalLM, saved
    path, hf = make_hf_multimodal_model(tmp_path, vision={"num_hidden_layers": 1})
    cfg = multimodal_config()                                         # ours, the same sizes

Weights are redrawn by `experiments.hf_reference.randomize_` so that every tensor is distinct and
activations stay O(1). Defaults are Scout-like (MoE in every layer); pass interleave_moe_layer_step=2
for Maverick's dense/MoE alternation. Chunks of 8 and floor_scale 4: a few dozen tokens cross
chunks and temperature steps several times.
"""
from __future__ import annotations

from pathlib import Path

import model
from experiments.hf_reference import hf_multimodal_model, hf_text_model
from model import config as C

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
            attention_chunk_size=8, max_position_embeddings=4096, floor_scale=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
# 32-pixel tiles of 4-pixel patches: 64 patches, 16 features per tile after the pixel shuffle.
# intermediate_size = 4 * hidden_size and the projector dims equal, as in the published models.
VISION = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=128, pixel_shuffle_ratio=0.5,
              vision_output_dim=48, projector_input_dim=48, projector_output_dim=48)


def text(**overrides) -> dict:
    """HF Llama4TextConfig fields of the tiny text model."""
    return {**TEXT, **overrides}


def vision_config(**overrides) -> model.VisionConfig:
    """Our VisionConfig of the tiny vision tower (HF field names in `overrides`)."""
    return C.from_hf({"model_type": "llama4", "vision_config": {**VISION, **overrides}}).vision


def multimodal_config(text_cfg: model.Config | None = None, image_token_id: int = 5,
                      **vision_overrides) -> model.Config:
    """Our Config: a text model (model.tiny() by default) with the tiny vision tower."""
    text_cfg = text_cfg or model.tiny()
    return model.Config(text=text_cfg.text, vision=vision_config(**vision_overrides),
                        image_token_id=image_token_id)


def make_hf_text_model(tmp_path: Path, name: str = "hf_text", seed: int = 0,
                       max_shard_size: str | None = None, **overrides):
    """(directory, model): a saved random Llama4ForCausalLM (keys model.*, lm_head.weight)."""
    hf = hf_text_model(text(**overrides), seed)
    return _save(hf, Path(tmp_path) / name, max_shard_size), hf


def make_hf_multimodal_model(tmp_path: Path, name: str = "hf_mm", seed: int = 0,
                             vision: dict | None = None, max_shard_size: str | None = None,
                             top: dict | None = None, **text_overrides):
    """(directory, model): a saved random Llama4ForConditionalGeneration, in the published
    layout (language_model.model.*, language_model.lm_head.weight, vision_model.*,
    multi_modal_projector.*)."""
    hf = hf_multimodal_model({**VISION, **(vision or {})}, text(**text_overrides), seed,
                             **(top or {}))
    return _save(hf, Path(tmp_path) / name, max_shard_size), hf


def _save(hf, path: Path, max_shard_size: str | None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(path, **kw)
    return path
