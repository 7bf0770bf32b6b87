"""Token packing into fixed-length rows, and a batch order that is a pure function of the step.

Rows hold T + 1 tokens: a model reads row[:T] and is scored on row[1:]. `batch_at(step)` depends
only on (rows, seed, batch size, step), so resuming at step s needs no iterator state beyond s;
the checkpoint still records the rows consumed and a fingerprint of the rows, and a resume checks
both (a changed data file would silently break "the same loss at the same step").

Packed rows attend across document boundaries (the model has no segment ids); every document
starts with `<|begin_of_text|>`, which marks the boundary for the model, as in GPT-style packing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .text import DataError, Document, read_documents


@dataclass
class Rows:
    tokens: np.ndarray   # [R, T + 1] int32
    weights: np.ndarray  # [R, T + 1] float32: loss weight of each token as a target
    real: np.ndarray     # [R, T + 1] bool: False on padding (excluded from router statistics)

    def __len__(self):
        return self.tokens.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """What a batch holds, each array [R, ...] indexed by row."""
        return {"tokens": self.tokens, "weights": self.weights, "real": self.real}

    def fingerprint(self) -> str:
        return fingerprint(self.arrays().values())


def fingerprint(arrays) -> str:
    """A short hash of the arrays' bytes: a resume refuses data that changed."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def pack_stream(docs: list[Document], seq_len: int) -> Rows:
    """Concatenate documents and cut rows of seq_len + 1 tokens that overlap by one token, so each
    token is a target exactly once; the incomplete tail is dropped. For long plain-text documents."""
    ids = np.concatenate([d.ids for d in docs])
    w = np.concatenate([d.weights for d in docs])
    R = (len(ids) - 1) // seq_len
    if R == 0:
        raise DataError(f"the data has {len(ids)} tokens: not enough for one row of "
                        f"{seq_len + 1}; use a shorter --seq or more data")
    idx = np.arange(R)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    w = w[idx]
    w[:, 0] = 0.0  # the first token of a row is context only (it was the previous row's target)
    return Rows(ids[idx], w, np.ones(idx.shape, bool))


def pack_records(docs: list[Document], seq_len: int, pad_id: int) -> Rows:
    """Whole records placed one after another into rows of seq_len + 1, a new row when the next
    record does not fit; padding fills the rest. A record longer than a row is cut into
    row-sized pieces (overlapping by one token, like `pack_stream`). For chat records."""
    L = seq_len + 1
    rows, cur = [], []

    def flush():
        if cur:
            ids = np.concatenate([d.ids for d in cur])
            w = np.concatenate([d.weights for d in cur])
            n = len(ids)
            rows.append((np.pad(ids, (0, L - n), constant_values=pad_id),
                         np.pad(w, (0, L - n)), np.arange(L) < n))
            cur.clear()

    used = 0
    for d in docs:
        n = len(d.ids)
        if n > L:
            flush()
            used = 0
            for s in range(0, n - 1, seq_len):
                piece = Document(d.ids[s:s + L], d.weights[s:s + L].copy())
                if s:
                    piece.weights[0] = 0.0
                cur.append(piece)
                flush()
            continue
        if used + n > L:
            flush()
            used = 0
        cur.append(d)
        used += n
    flush()
    tokens, weights, real = (np.stack(a) for a in zip(*rows))
    return Rows(tokens.astype(np.int32), weights.astype(np.float32), real)


def pack(docs: list[Document], kind: str, seq_len: int, pad_id: int) -> Rows:
    rows = pack_stream(docs, seq_len) if kind == "text" else pack_records(docs, seq_len, pad_id)
    if rows.weights[:, 1:].sum() == 0:
        raise DataError("the data has no loss targets (no assistant turns?)")
    return rows


def read_token_data(tok, paths, seq: int, pad_id: int) -> tuple[Rows, str, str]:
    """Text files or chat records packed into rows (SFT's data, and distillation's): (rows, kind
    "text" or "chat", a line saying what they hold)."""
    docs, kind = read_documents(tok, paths)
    rows = pack(docs, kind, seq, pad_id)
    return rows, kind, (f"{len(docs)} {kind} documents -> {len(rows)} rows of {seq + 1} tokens, "
                        f"{int(rows.weights.sum()):,} targets")


def pad_rows(docs: list[Document], seq_len: int, pad_id: int):
    """One document a row, padded: (tokens, weights, real) [len(docs), seq_len + 1]; each
    document at most seq_len + 1 tokens (the caller says where one is longer)."""
    n = np.array([len(d.ids) for d in docs])
    real = np.arange(seq_len + 1)[None, :] < n[:, None]
    tokens = np.full(real.shape, pad_id, np.int32)
    weights = np.zeros(real.shape, np.float32)
    tokens[real] = np.concatenate([d.ids for d in docs])
    weights[real] = np.concatenate([d.weights for d in docs])
    return tokens, weights, real


class Batches:
    """Batch `step` = rows [step * B, (step + 1) * B) of an endless sequence of epochs, each epoch
    a permutation of all rows drawn from (seed, epoch). `rows`: anything with `len` and
    `arrays()` (Rows; the preference pairs of training.dpo). The train loop reads it as a
    source of batches: `batch_at`, `abstract`, `position` and `restore` (see training.loop)."""

    def __init__(self, rows, batch_size: int, seed: int):
        self.rows, self.B, self.seed = rows, batch_size, seed
        self._arrays = rows.arrays()
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def rows_consumed(self, step: int) -> int:
        return step * self.B

    def position(self, step: int) -> dict:
        return {"rows_consumed": self.rows_consumed(step)}

    def restore(self, meta: dict):
        """Nothing to restore: the order is a function of the step."""

    def abstract(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {k: ((self.B, *a.shape[1:]), a.dtype) for k, a in self._arrays.items()}

    def batch_at(self, step: int, params=None) -> dict[str, np.ndarray]:
        R = len(self.rows)
        g = np.arange(step * self.B, (step + 1) * self.B)
        idx = np.concatenate([self._order(e)[g[g // R == e] % R] for e in np.unique(g // R)])
        return {k: a[idx] for k, a in self._arrays.items()}
