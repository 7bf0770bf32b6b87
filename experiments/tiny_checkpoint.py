"""A tiny random Llama 4 checkpoint in the published HF layout, with a small tokenizer.

    path = tiny_checkpoint.build("tiny-llama4")

What colab/checkpoints.ipynb runs on when no HF token is given (and in CI, which downloads
nothing): the files a published Llama 4 checkpoint has, in its key layout
(Llama4ForConditionalGeneration: language_model.model.*, vision_model.*,
multi_modal_projector.*), with widths of a few dozen and random weights drawn by
`experiments.hf_reference` through transformers. Beside config.json and model.safetensors:
tokenizer.json, tokenizer_config.json and chat_template.jinja (as transformers writes them),
generation_config.json and preprocessor_config.json. The tokenizer is a
byte-level BPE trained on a few of the Python standard library's sources, holding Llama 4's
special tokens; the config's token ids (BOS, stops, pad, <|patch|>, image start and end) are that
tokenizer's.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.tokenizer import SPECIAL

TEXT = dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=32,
            max_position_embeddings=4096, floor_scale=32)
# The vision MLP is 4x its width and the three projector widths are equal, as in the published
# models (what pixel shuffle at ratio 0.5 and the adapter need).
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              image_size=32, patch_size=8, pixel_shuffle_ratio=0.5, projector_input_dim=64,
              projector_output_dim=64, vision_output_dim=64)


def train_tokenizer(corpus, vocab_size: int) -> Tokenizer:
    """A byte-level BPE over the texts of `corpus`, Llama 4's special tokens first; like Llama 4's
    fast tokenizer, its post-processor prepends BOS."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bos = SPECIAL["bos"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    return tk


def build(path, seed: int = 0, vocab_size: int = 1024, files: int = 10) -> Path:
    """Write the checkpoint into the new directory `path`; returns it. `files`: how many stdlib
    sources the tokenizer is trained on."""
    from experiments.hf_reference import hf_multimodal_model
    from experiments.quickstart import stdlib_files
    corpus = [Path(f).read_text(encoding="utf-8", errors="replace")
              for f in stdlib_files()[0][:files]]
    tk = train_tokenizer(corpus, vocab_size)
    special = {name: tk.token_to_id(token) for name, token in SPECIAL.items()}
    text = {**TEXT, "vocab_size": tk.get_vocab_size(), "bos_token_id": special["bos"],
            "eos_token_id": [special[n] for n in ("eos", "eom", "eot")],
            "pad_token_id": special["pad"]}
    hf = hf_multimodal_model(VISION, text, seed, image_token_index=special["patch"],
                             boi_token_index=special["image_start"],
                             eoi_token_index=special["image_end"])
    path = Path(path)
    hf.save_pretrained(path)
    write_tokenizer(path, tk, special)
    # Sampling as Meta's reference chat defaults (llama-models, llama4/generation.py)
    generation = {"bos_token_id": special["bos"], "do_sample": True,
                  "eos_token_id": text["eos_token_id"], "pad_token_id": special["pad"],
                  "temperature": 0.6, "top_p": 0.9}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(
        preprocessor_config(VISION["image_size"]), indent=2) + "\n")
    return path


# Llama 4's layout in a short template; HF's own also renders images, tools and system prompts.
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|header_start|>' + m['role'] + "
    "'<|header_end|>\\n\\n' + m['content'] + '<|eot|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}")


def write_tokenizer(path: Path, tk: Tokenizer, special: dict[str, int]):
    """tokenizer.json and transformers' tokenizer_config.json (and what it writes with it)."""
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIAL["bos"],
                                   eos_token=SPECIAL["eot"], pad_token=SPECIAL["pad"],
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)


def preprocessor_config(tile: int) -> dict:
    """HF's Llama4ImageProcessor settings, for tiles of `tile` pixels (model.image_processing)."""
    return {"image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
            "size": {"height": tile, "width": tile}, "max_patches": 16,
            "resize_to_max_canvas": False, "do_convert_rgb": True, "do_resize": True,
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
