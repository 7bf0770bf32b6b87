"""Llama 4's tokenizer (`tokenizer.json` via the `tokenizers` library) and its chat layout.

The chat layout (LLAMA4.md section 5):
    <|begin_of_text|><|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>...
    <|header_start|>assistant<|header_end|>\\n\\n          (the generation prompt)
The HF fast tokenizer's post-processor prepends BOS, and the template writes it too; we encode
with `add_special_tokens=False` and place BOS ourselves, so it is never doubled.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

SPECIAL = {
    "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "header_start": "<|header_start|>",
    "header_end": "<|header_end|>", "eom": "<|eom|>", "eot": "<|eot|>",
    "pad": "<|finetune_right_pad|>", "image_start": "<|image_start|>",
    "image_end": "<|image_end|>", "image": "<|image|>", "patch": "<|patch|>",
    "tile_x_separator": "<|tile_x_separator|>", "tile_y_separator": "<|tile_y_separator|>",
    "python_start": "<|python_start|>", "python_end": "<|python_end|>",
}


def chat_role(role: str) -> str:
    """The role name written in a header: Llama 4 calls the tool role `ipython`."""
    return "ipython" if role == "tool" else role


class Tokenizer:
    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        # id of each special token this tokenizer has (tiny test tokenizers may lack some)
        self.special = {name: tk.token_to_id(tok) for name, tok in SPECIAL.items()
                        if tk.token_to_id(tok) is not None}

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a checkpoint directory holding tokenizer.json, or the file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        return [self.special[n] for n in ("eos", "eom", "eot") if n in self.special]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.special["bos"], *ids] if bos and "bos" in self.special else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Iterable[dict], add_generation_prompt: bool = True) -> str:
        """The chat as text, special tokens included (BOS first)."""
        out = [SPECIAL["bos"]]
        for m in messages:
            role = chat_role(m["role"])
            out.append(f"{SPECIAL['header_start']}{role}{SPECIAL['header_end']}\n\n"
                       f"{m['content']}{SPECIAL['eot']}")
        if add_generation_prompt:
            out.append(f"{SPECIAL['header_start']}assistant{SPECIAL['header_end']}\n\n")
        return "".join(out)

    def encode_chat(self, messages: Iterable[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), bos=False)

    def stream(self, ids: Iterable[int], skip_special: bool = True) -> Iterator[str]:
        """Text pieces as tokens arrive; a multi-byte character is held back until complete."""
        decoder = DecodeStream(skip_special_tokens=skip_special)
        for i in ids:
            piece = decoder.step(self.tk, int(i))
            if piece:
                yield piece
