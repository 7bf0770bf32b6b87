"""Tiny random HF Llama 4 models saved with save_pretrained, for conversion and parity tests.

    path, model = make_hf_text_model(tmp_path, num_hidden_layers=6)        # Llama4ForCausalLM
    path, model = make_hf_multimodal_model(tmp_path, vision={"num_hidden_layers": 1})

Weights are redrawn by `experiments.hf_reference.randomize_` so that every tensor is distinct and
activations stay O(1). Defaults are Scout-like (MoE in every layer); pass interleave_moe_layer_step=2
for Maverick's dense/MoE alternation.
"""
from __future__ import annotations

from pathlib import Path

from transformers import (Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration,
                          Llama4TextConfig)

from experiments.hf_reference import randomize_

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
            attention_chunk_size=8, max_position_embeddings=256, floor_scale=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
# intermediate_size = 4 * hidden_size and projector dims equal: what pixel shuffle (ratio 0.5)
# and the adapter need for a forward pass to be well-shaped, as in the published models.
VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=16, patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=32,
              projector_output_dim=32, vision_output_dim=32)


def llama4_text_config(**overrides) -> Llama4TextConfig:
    return Llama4TextConfig(**{**TEXT, **overrides})


def llama4_config(vision: dict | None = None, top: dict | None = None,
                  **text_overrides) -> Llama4Config:
    return Llama4Config(text_config={**TEXT, **text_overrides},
                        vision_config={**VISION, **(vision or {})}, **(top or {}))


def make_hf_text_model(tmp_path: Path, name: str = "hf_text", seed: int = 0,
                       max_shard_size: str | None = None, **overrides):
    """(directory, model): a saved random Llama4ForCausalLM (keys model.*, lm_head.weight)."""
    model = randomize_(Llama4ForCausalLM(llama4_text_config(**overrides)), seed).eval()
    return _save(model, Path(tmp_path) / name, max_shard_size), model


def make_hf_multimodal_model(tmp_path: Path, name: str = "hf_mm", seed: int = 0,
                             vision: dict | None = None, max_shard_size: str | None = None,
                             top: dict | None = None, **text_overrides):
    """(directory, model): a saved random Llama4ForConditionalGeneration, in the published
    layout (language_model.model.*, language_model.lm_head.weight, vision_model.*,
    multi_modal_projector.*)."""
    model = randomize_(Llama4ForConditionalGeneration(llama4_config(vision, top, **text_overrides)),
                       seed).eval()
    return _save(model, Path(tmp_path) / name, max_shard_size), model


def _save(model, path: Path, max_shard_size: str | None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path
