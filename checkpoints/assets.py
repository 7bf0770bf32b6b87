"""The files of a checkpoint other than its weights and config: the tokenizer, the chat
template, the image processor's settings, the generation defaults, the licence.

Every conversion carries them (HF -> Orbax -> HF, a training run -> either) and a fine-tuning
run copies its --init's, so that a converted or fine-tuned checkpoint tokenizes, chats and samples
as its source did. The list is explicit: a published repository also holds other things (Meta's
own weights under original/, hundreds of GB), which are not ours to copy.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from checkpoints.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
# generation defaults, the image processor's settings; the licence and use policy, which the
# Llama 4 Community License asks redistributed copies to carry
OTHER_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
               "LICENSE", "USE_POLICY.md")
FILES = TOKENIZER_FILES + OTHER_FILES
GENERATION = "generation_config.json"
# transformers' GenerationConfig defaults, which apply to the fields a file leaves out
HF_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def copy(src: Path, dst: Path, names: tuple[str, ...] = FILES) -> list[str]:
    """Copy into `dst` those of `names` that `src` holds; returns their names."""
    found = [n for n in names if (Path(src) / n).is_file()]
    for name in found:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return found


def generation_defaults(directory: Path, vocab_size: int) -> dict:
    """What generation_config.json in `directory` says, as arguments of model.generate:
    stop_tokens (its eos_token_id) and, where it sets do_sample, temperature, top_k and top_p
    (transformers' defaults for those it leaves out; top_k at most the vocabulary, as HF clamps
    it). Without do_sample HF decodes greedily, whatever temperature the file holds, and so
    does this: no sampling keys. {} without the file."""
    path = Path(directory) / GENERATION
    if not path.is_file():
        return {}
    try:
        g = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(g, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    out = {}
    eos = g.get("eos_token_id")
    if eos is not None:
        ids = [eos] if isinstance(eos, int) else eos
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size
                                                for i in ids):
            raise CheckpointError(f"{path}: eos_token_id {eos!r} is not a token id (or a list "
                                  f"of them) of the model's vocabulary 0..{vocab_size - 1}")
        out["stop_tokens"] = ids
    if g.get("do_sample"):
        out |= {k: g.get(k) if g.get(k) is not None else v for k, v in HF_SAMPLING.items()}
        # As HF's warpers: top_k 0 and top_p 1 filter nothing
        out["top_k"] = min(out["top_k"], vocab_size) or None
        out["top_p"] = out["top_p"] if out["top_p"] < 1 else None
    return out
