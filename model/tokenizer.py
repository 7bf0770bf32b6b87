"""Llama 4's tokenizer (`tokenizer.json` via the `tokenizers` library) and Meta's chat format.

We follow Meta's reference, the format the model was trained on (llama-models,
`llama4/chat_format.py` and `llama4/tokenizer.py`; a test holds our ids equal to its `ChatFormat`):

    <|begin_of_text|>
    <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>     one per message
    <|header_start|>assistant<|header_end|>\\n\\n                   the generation prompt

The role `tool` is written `ipython`. A tool message ends with `<|eom|>` instead of `<|eot|>`,
and so does an assistant message with `"stop_reason": "end_of_message"` (a turn that stops for
a tool call). Each piece (header, content, end token) is encoded on its own.

Where HF's chat template (transformers' Llama 4 processor) differs, we follow Meta:
- HF renders the chat to one string and tokenizes it whole, so BPE merges across pieces: a
  message that starts with a newline shares one token "\\n\\n\\n" with its header, where Meta has
  "\\n\\n" then "\\n".
- HF turns special-token text inside a message into control tokens: a user who types `<|eot|>`
  ends their turn, `<|patch|>` becomes an image slot. Meta encodes message text as plain text,
  so only the layout places control tokens. So does `encode`, unless `allow_special=True`.
- HF ends every message with `<|eot|>`, tool messages too.
- Meta cuts runs of more than 25,000 whitespace or non-whitespace characters before BPE (a
  tiktoken limit), so such text gets other ids than BPE over the whole run; HF does not cut.
- HF's fast tokenizer prepends BOS and its template writes BOS too (doubling it when the rendered
  template is encoded with special tokens); we encode without and place the one BOS ourselves.
"""
from __future__ import annotations

import functools
import re
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
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython",
         "ipython": "ipython"}  # role in a message -> name written in its header
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")  # Meta's StopReason values
# Meta's tokenizer.py: text is encoded in slices of at most 400,000 characters, each cut further
# so that no piece holds a run of more than 25,000 whitespace or non-whitespace characters.
MAX_ENCODE_CHARS, MAX_RUN = 400_000, 25_000


@functools.cache
def _long_run(max_run: int) -> re.Pattern:
    return re.compile(rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}")


def split_runs(text: str, max_run: int = MAX_RUN) -> Iterator[str]:
    """The pieces Meta's tokenizer encodes one by one: slices of MAX_ENCODE_CHARS characters,
    cut every `max_run` characters inside a longer run of one class (whitespace as `str.isspace`,
    which is what `\\s` matches in a str pattern). Only starts of runs are tried, so this is linear."""
    long_run = _long_run(max_run)
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        cut = 0
        for m in long_run.finditer(chunk):
            for c in range(m.start() + max_run, m.end(), max_run):
                yield chunk[cut:c]
                cut = c
        yield chunk[cut:]


def _check_message(m, i: int) -> tuple[str, str, bool]:
    """(header role, content, ends with <|eom|>) of message i, or a ValueError naming it."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
            or not isinstance(m.get("content"), str):
        raise ValueError(f"message {i}: needs a string 'role' and a string 'content', got {m!r}")
    extra = sorted(set(m) - {"role", "content", "stop_reason"})
    if extra:  # Meta's context and tool_calls change the tokens; silently dropping them would too
        raise ValueError(f"message {i}: unsupported field(s) {extra} (a message has 'role', "
                         "'content' and, for the assistant, 'stop_reason')")
    if m["role"] not in ROLES:
        raise ValueError(f"message {i}: role {m['role']!r} is not one of {sorted(ROLES)}")
    role = ROLES[m["role"]]
    stop = m.get("stop_reason", "end_of_turn")
    if stop not in STOP_REASONS or (stop != "end_of_turn" and role != "assistant"):
        raise ValueError(f"message {i}: stop_reason {stop!r} is not allowed; an assistant message "
                         f"may have one of {list(STOP_REASONS)}")
    return role, m["content"], role == "ipython" or stop == "end_of_message"


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

    def _id(self, name: str) -> int:
        if name not in self.special:
            raise ValueError(f"the tokenizer has no {SPECIAL[name]} token, which the chat "
                             "format needs")
        return self.special[name]

    def encode(self, text: str, bos: bool = True, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first when `bos`. Special-token text in `text` (say
        "<|eot|>") is plain text unless `allow_special`, as in Meta's tokenizer."""
        # The flag lives on the tokenizers object (it is not saved with tokenizer.json).
        self.tk.encode_special_tokens = not allow_special
        pieces = self.tk.encode_batch(list(split_runs(text)), add_special_tokens=False)
        ids = [i for piece in pieces for i in piece.ids]
        return [self.special["bos"], *ids] if bos and "bos" in self.special else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def encode_header(self, role: str) -> list[int]:
        """<|header_start|>{role}<|header_end|>\\n\\n, each piece encoded on its own."""
        return [self._id("header_start"), *self.encode(role, bos=False), self._id("header_end"),
                *self.encode("\n\n", bos=False)]

    def chat_pieces(self, messages: Iterable[dict], add_generation_prompt: bool = True
                    ) -> Iterator[tuple[list[int], bool]]:
        """The chat as (ids, by the assistant) pieces in order: `encode_chat` joins the ids, and
        training scores the pieces by the assistant (its messages' content and end token).
        Messages: {"role": system|user|assistant|tool, "content": str} and, on an assistant
        message, "stop_reason" (Meta's: end_of_turn (default), end_of_message, out_of_tokens)."""
        yield [self._id("bos")], False
        for i, m in enumerate(messages):
            role, content, eom = _check_message(m, i)
            yield self.encode_header(role), False
            yield self.encode(content, bos=False) + [self._id("eom" if eom else "eot")], \
                role == "assistant"
        if add_generation_prompt:
            yield self.encode_header("assistant"), False

    def encode_chat(self, messages: Iterable[dict], add_generation_prompt: bool = True) -> list[int]:
        """Meta's `ChatFormat.encode_dialog_prompt` (without the generation prompt when
        `add_generation_prompt` is False); see the module docstring."""
        return [i for ids, _ in self.chat_pieces(messages, add_generation_prompt) for i in ids]

    def stream(self, ids: Iterable[int], skip_special: bool = True) -> Iterator[str]:
        """Text pieces as tokens arrive; a multi-byte character is held back until complete."""
        decoder = DecodeStream(skip_special_tokens=skip_special)
        for i in ids:
            piece = decoder.step(self.tk, int(i))
            if piece:
                yield piece
