"""Tiny-to-mid random HF Llama 4 models for parity tests and benchmarks (no downloads).

Weights are drawn so that activations stay O(1) through many layers (HF's default init of 0.02
makes every layer nearly the identity, which would hide bugs), in fp32.
"""
from __future__ import annotations

import tempfile

import torch


def randomize_(module: torch.nn.Module, seed: int):
    """Norm weights near 1; every matrix scaled by 1/sqrt(fan_in); embeddings at unit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases, class embedding
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-2] if name.endswith(("gate_up_proj", "down_proj")) and p.ndim == 3 else p.shape[-1]
                scale = 1.0 if "embed" in name else fan_in ** -0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def hf_text_model(overrides: dict, seed: int = 0):
    """An eager-attention `Llama4ForCausalLM` with the given `Llama4TextConfig` fields."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    cfg = Llama4TextConfig(**overrides)
    cfg._attn_implementation = "eager"
    return randomize_(Llama4ForCausalLM(cfg), seed).eval()


def params_from_hf(hf_model):
    """Our (cfg, params) for an HF model, through the real checkpoint reader."""
    import checkpoints
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return checkpoints.load(d)


def hf_multimodal_model(vision: dict, text: dict, seed: int = 0, **top):
    """An eager-attention `Llama4ForConditionalGeneration` from `Llama4VisionConfig` fields,
    `Llama4TextConfig` fields and top-level `Llama4Config` fields (e.g. image_token_index)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    cfg = Llama4Config(vision_config=vision, text_config=text, **top)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    return randomize_(Llama4ForConditionalGeneration(cfg), seed).eval()
