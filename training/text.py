"""Tokenizers and documents: text files and JSONL chat records -> (token ids, loss weights).

A document is a pair of equal-length arrays: `ids` [n] int32 and `weights` [n] float32, where
`weights[j]` says whether token j is a training *target* (the token predicted from ids[:j]).

Chat records use Meta's chat format, exactly as `model.tokenizer.Tokenizer.encode_chat` writes it
(message text is plain text: special-token text in it never becomes a control token). Only the
assistant turns' content and their closing `<|eot|>` (or `<|eom|>`) are targets, so the model
learns to answer and to stop, not to imitate the user.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


class DataError(ValueError):
    """Training data we cannot use (missing, empty, malformed); the message names the file."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


# Appended, never reordered: ids 256.. are what earlier runs were trained with.
BYTE_SPECIALS = ("bos", "eos", "header_start", "header_end", "eot", "pad", "eom")


def byte_tokenizer():
    """For from-scratch runs: token b < 256 is the byte b, then the few Llama 4 special tokens
    that training and chat need (ids 256..262). Built as a `tokenizers` tokenizer.json (byte-level,
    no merges), so it is a `model.tokenizer.Tokenizer` like a checkpoint's and is saved beside
    the checkpoints it trained."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from model.tokenizer import SPECIAL, Tokenizer
    chars = _bytes_to_unicode()
    tk = HFTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(SPECIAL[n], special=True) for n in BYTE_SPECIALS])
    return Tokenizer(tk)


def is_byte_tokenizer(tok) -> bool:
    """Whether `tok` is `byte_tokenizer()` (one token a byte: a loss per token is per byte)."""
    return tok.tk.get_vocab(with_added_tokens=True) == _byte_vocab()


@functools.cache
def _byte_vocab() -> dict[str, int]:
    return byte_tokenizer().tk.get_vocab(with_added_tokens=True)


def load_tokenizer(path: str | None):
    """A checkpoint's tokenizer.json (file or directory) via `model.tokenizer`; bytes if None."""
    if path is None:
        return byte_tokenizer()
    from model.tokenizer import Tokenizer
    try:
        return Tokenizer.load(path)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


@dataclass
class Document:
    ids: np.ndarray      # [n] int32
    weights: np.ndarray  # [n] float32: 1 where token j is a loss target


def text_document(tok, text: str) -> Document:
    """BOS + text + EOS; every token but the BOS is a target (nothing precedes the BOS)."""
    ids = tok.encode(text, bos=True) + [tok.special["eos"]]
    w = np.ones(len(ids), np.float32)
    w[0] = 0.0
    return Document(np.asarray(ids, np.int32), w)


def chat_document(tok, messages: list, where: str = "record", context: int = 0) -> Document:
    """The chat as `Tokenizer.encode_chat` lays it out (without a generation prompt); the pieces
    the assistant wrote (its content and end token) are the targets, except in the first
    `context` messages (a DPO prompt's history is context only)."""
    ids, w = [], []
    try:
        pieces = tok.chat_pieces(messages, add_generation_prompt=False)
        for i, (piece, by_assistant) in enumerate(pieces):
            ids += piece
            # Piece 0 is the BOS; then each message is a header piece and a content piece.
            w += [float(by_assistant and (i - 1) // 2 >= context)] * len(piece)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return Document(np.asarray(ids, np.int32), np.asarray(w, np.float32))


def jsonl_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line of a JSONL file, where = "PATH:LINE"; a line that
    is not UTF-8 or not JSON is a DataError naming it."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def _read_jsonl(tok, path: str) -> list[Document]:
    docs = []
    for where, rec in jsonl_records(path):
        messages = rec.get("messages") if isinstance(rec, dict) else rec
        if not isinstance(messages, list):
            raise DataError(f"{where}: expected {{'messages': [...]}} or a list of messages")
        doc = chat_document(tok, messages, where)
        if doc.weights.sum() == 0:
            raise DataError(f"{where}: no assistant message, so nothing to learn from")
        docs.append(doc)
    return docs


TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".jsonl")


def expand_paths(paths: Iterable[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[str]:
    """Files as given; a directory stands for its files with these suffixes (recursively, sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                           if f.endswith(suffixes))
            if not found:
                raise DataError(f"directory {p!r} has no {'/'.join(suffixes)} files")
            out += found
        elif os.path.exists(p):  # a file, or a device or pipe read like one (/dev/stdin, <(...))
            out.append(p)
        else:
            raise DataError(f"data file {p!r} does not exist")
    return out


def read_documents(tok, paths: Iterable[str]) -> tuple[list[Document], str]:
    """Documents from text files (one document per file) or `.jsonl` chat files (one per record).
    Returns (documents, kind) with kind "text" or "chat"; mixing the two kinds is an error."""
    paths = list(paths)
    if not paths:
        raise DataError("no data files given")
    need = {"bos", "eos"} | ({"header_start", "header_end", "eot"}
                             if any(p.endswith(".jsonl") for p in paths) else set())
    if need - set(tok.special):
        raise DataError(f"the tokenizer lacks the special tokens {sorted(need - set(tok.special))} "
                        "that this data needs")
    docs, kinds = [], set()
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"data file {p!r} does not exist")
        try:
            if p.endswith(".jsonl"):
                kinds.add("chat")
                new = _read_jsonl(tok, p)
            else:
                kinds.add("text")
                with open(p, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                new = [text_document(tok, text)] if text.strip() else []
        except OSError as e:  # a directory, no permission, ...
            raise DataError(f"data file {p!r}: cannot read it ({e.strerror})") from None
        if not new and len(paths) == 1:
            raise DataError(f"data file {p!r} is empty")
        docs += new
    if len(kinds) > 1:
        raise DataError("mixing plain-text and .jsonl chat files in one run is not supported")
    if not docs:
        raise DataError(f"all {len(paths)} data files are empty")
    return docs, kinds.pop()
