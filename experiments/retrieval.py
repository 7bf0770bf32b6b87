"""Passkey retrieval: a generated needle-in-a-haystack task (nothing is downloaded).

An example of `length` tokens is: BOS, filler text with the needle "\\n#passkey=48213\\n" placed at
`depth` (0: right after BOS, 1: just before the query), then the query "\\n#passkey=" and the
answer "48213". The filler is ordinary text (for the ablations, Python standard-library sources),
so the needle is found by content, not by standing out of a repeated pattern.

A model retrieves the key when greedy decoding after the query gives the answer. That is scored
in one forward pass over the whole example: greedy decoding yields the answer exactly when every
answer token is the argmax given the prompt and the answer tokens before it.

Training rows (`training_rows`) are examples of the training length with a random depth, mixed
into the training data where an ablation asks for retrieval; evaluation (`grid`) draws examples
by length and depth. With a subword tokenizer the answer is encoded on its own, as decoding
would have to produce it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training import Rows

NEEDLE = "\n#passkey={key}\n"
QUERY = "\n#passkey="
DIGITS = 5
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Examples:
    """Examples of one length: ids [n, length] (prompt then answer), the answer's last `answer`
    tokens, the needle's depth of each."""
    ids: np.ndarray
    answer: int
    depths: np.ndarray


def _key(tok, rng) -> tuple[str, list[int]]:
    """A random key whose tokens number answer_length(tok), so that the examples of one length
    are aligned (a subword tokenizer may split some keys differently)."""
    n = answer_length(tok)
    for _ in range(100):
        key = str(rng.integers(10 ** (DIGITS - 1), 10 ** DIGITS))
        answer = tok.encode(key, bos=False)
        if len(answer) == n:
            return key, answer
    raise ValueError(f"this tokenizer splits {DIGITS}-digit keys into varying numbers of tokens "
                     f"(not {n} in 100 draws): no aligned passkey examples")


def _example(tok, filler: np.ndarray, length: int, depth: float, rng) -> np.ndarray:
    key, answer = _key(tok, rng)
    needle = tok.encode(NEEDLE.format(key=key), bos=False)
    query = tok.encode(QUERY, bos=False)
    bos = tok.encode("", bos=True)  # [BOS], or nothing for a tokenizer without one
    n_fill = length - len(bos) - len(needle) - len(query) - len(answer)
    if n_fill < 0:
        raise ValueError(f"a passkey example needs more than {length} tokens")
    if len(filler) < n_fill:
        raise ValueError(f"{len(filler)} filler tokens are fewer than the {n_fill} an example of "
                         f"{length} tokens needs")
    start = int(rng.integers(0, len(filler) - n_fill + 1))
    hay = filler[start:start + n_fill]
    at = round(depth * n_fill)
    return np.concatenate([bos, hay[:at], needle, hay[at:], query, answer]).astype(np.int32)


def answer_length(tok) -> int:
    return len(tok.encode("9" * DIGITS, bos=False))


def filler_tokens(docs) -> np.ndarray:
    """The documents' text tokens end to end, without their BOS and EOS (training.text docs)."""
    return np.concatenate([d.ids[1:-1] for d in docs]).astype(np.int32)


def examples(tok, filler: np.ndarray, length: int, depths, seed: int) -> Examples:
    """One example per entry of `depths`, each `length` tokens long."""
    rng = np.random.default_rng(seed)
    ids = np.stack([_example(tok, filler, length, float(d), rng) for d in depths])
    return Examples(ids, answer_length(tok), np.asarray(depths, np.float32))


def grid(tok, filler: np.ndarray, lengths, per_depth: int, depths=DEPTHS,
         seed: int = 0) -> dict[int, Examples]:
    """For each length, `per_depth` examples at each depth."""
    return {n: examples(tok, filler, n, np.repeat(depths, per_depth), seed + i)
            for i, n in enumerate(lengths)}


def training_rows(tok, filler: np.ndarray, seq_len: int, n: int, seed: int,
                  answer_weight: float = 1.0):
    """n training rows (training.Rows, seq_len + 1 tokens) of examples at uniform random depths;
    every token but the BOS is a target, as in the packed text rows, the answer's tokens
    weighing `answer_weight` in the loss."""
    depths = np.random.default_rng([seed, 1]).uniform(0, 1, n)
    ex = examples(tok, filler, seq_len + 1, depths, seed)
    ids = ex.ids
    weights = np.ones(ids.shape, np.float32)
    weights[:, 0] = 0.0
    weights[:, -ex.answer:] = answer_weight
    return Rows(ids, weights, np.ones(ids.shape, bool))


def correct(predicted: np.ndarray, ex: Examples) -> np.ndarray:
    """predicted [n, answer]: the argmax tokens at the positions before each answer token (the
    logits at [-answer - 1, -1)) of the n examples of ex -> [n] bool: the whole answer."""
    return np.all(predicted == ex.ids[:, -ex.answer:], axis=1)


def batches(a: np.ndarray, batch: int):
    """a [R, ...] in batches of exactly `batch` rows (the last padded with row 0), so that one
    compiled program serves them all; yields (batch, number of real rows)."""
    for i in range(0, len(a), batch):
        part = a[i:i + batch]
        n = len(part)
        yield np.concatenate([part, np.repeat(a[:1], batch - n, 0)]) if n < batch else part, n


def score(forward, grid: dict[int, Examples], batch: int, pad_id: int,
          one_length: bool = False) -> dict:
    """Exact-match accuracy of each length of `grid`: {"lengths": [L], "depths": [d],
    "accuracy": [per length, all depths], "by_depth": [[per depth] per length]}.
    forward(ids [batch, L]) -> logits [batch, L, V]. `one_length`: every example padded at its end
    to the longest length, so that one compiled forward serves all (causal attention: what
    precedes the padding is unchanged), for models whose compilation costs more than the longer
    forward passes."""
    longest = max(grid)
    pad = np.full((batch, longest), pad_id, np.int32)
    lengths = sorted(grid)
    depths = sorted({float(d) for ex in grid.values() for d in ex.depths})
    accuracy, by_depth = [], []
    for length in lengths:
        ex = grid[length]
        predicted = []
        for ids, n in batches(ex.ids, batch):
            if one_length:
                ids = np.concatenate([ids, pad[:, length:]], axis=1)
            logits = np.asarray(forward(ids))[:n, length - ex.answer - 1:length - 1]
            predicted.append(logits.argmax(-1))
        hits = correct(np.concatenate(predicted), ex)
        accuracy.append(float(hits.mean()))
        by_depth.append([float(hits[ex.depths == np.float32(d)].mean()) for d in depths])
    return {"lengths": lengths, "depths": depths, "accuracy": accuracy, "by_depth": by_depth}
