"""Verifiable tasks (GRPO's prompts, pass-rate filtering): generated, and checked exactly.

A task file is JSONL, one task a line: {"prompt": ..., "answer": "..."}.
- "prompt": plain text, which the model continues (BOS + prompt), or a list of chat messages
  (Meta's chat format, then the assistant's generation prompt).
- "answer": the exact text of a correct completion.
A sample scores 1 when it stops (a stop token: eos, eom or eot) and the text before the stop
token equals the answer, character for character; else 0. Other fields are ignored.

`make(kind, n, seed)` generates n distinct tasks of a kind (`python -m experiments.make_tasks`):
- add: "23+9=" -> "32", operands of up to `digits` digits;
- reverse: "reverse abc:" -> "cba", `digits` letters from a-h (the alphabet kept small so that
  a small model has seen every letter in every place);
- compare: "31?7" -> ">", two different numbers of up to `digits` digits, the answer "<" or ">"
  (one token: a small model learns it from the reward alone, in tens of steps).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

import model

from .data import fingerprint
from .text import DataError, jsonl_records

KINDS = ("add", "reverse", "compare")


@dataclass
class Tasks:
    prompts: list[list[int]]   # token ids, BOS (and for chat the generation prompt) included
    answers: list[str]
    lines: list[str]           # "PATH:LINE" of each task, for reports

    def __len__(self):
        return len(self.prompts)

    def fingerprint(self) -> str:
        flat = np.concatenate([np.asarray(p, np.int32) for p in self.prompts])
        return fingerprint([flat, np.asarray([len(p) for p in self.prompts]),
                            np.frombuffer("\0".join(self.answers).encode(), np.uint8)])


def encode_prompt(tok, prompt, where: str) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt, bos=True)
    if isinstance(prompt, list):
        try:
            return tok.encode_chat(prompt, add_generation_prompt=True)
        except ValueError as e:
            raise DataError(f"{where}: prompt: {e}") from None
    raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got "
                    f"{type(prompt).__name__}")


def read_tasks(tok, path: str) -> Tasks:
    prompts, answers, lines = [], [], []
    for where, rec in jsonl_records(path):
        if not isinstance(rec, dict) or not {"prompt", "answer"} <= set(rec):
            raise DataError(f"{where}: a task is an object with 'prompt' and 'answer'")
        if not isinstance(rec["answer"], str) or not rec["answer"]:
            raise DataError(f"{where}: 'answer' must be a non-empty string, got {rec['answer']!r}")
        prompts.append(encode_prompt(tok, rec["prompt"], where))
        answers.append(rec["answer"])
        lines.append(where)
    if not prompts:
        raise DataError(f"task file {path!r} has no tasks")
    return Tasks(prompts, answers, lines)


def completion(ids, stop_ids) -> tuple[list[int], bool]:
    """The tokens of a sampled completion up to and including its first stop token, and whether
    it stopped."""
    ids = list(map(int, ids))
    for j, t in enumerate(ids):
        if t in stop_ids:
            return ids[:j + 1], True
    return ids, False


def reward(tok, new_ids, answer: str) -> float:
    """1.0 when the completion stops and its text before the stop token is `answer`, else 0.0."""
    ids, stopped = completion(new_ids, set(tok.stop_ids))
    return float(stopped and tok.decode(ids[:-1], skip_special=False) == answer)


def sample(cfg, params, tok, prompts: list[list[int]], *, max_new_tokens: int,
           temperature: float, seed, mesh=None, rules="combined") -> np.ndarray:
    """New tokens [len(prompts), max_new_tokens] (pad after a stop) from model.generate."""
    ids = model.generate(cfg, params, prompts, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, stop_tokens=tok.stop_ids,
                         mesh=mesh, rules=rules)
    return ids[:, ids.shape[1] - max_new_tokens:]


def pass_rates(cfg, params, tok, tasks: Tasks, *, samples: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 16, seed: int = 0, batch: int = 64) -> np.ndarray:
    """Each task's share of `samples` samples that score 1 [len(tasks)] (greedy: samples 1,
    temperature 0), `batch` rows per generate call."""
    rows = [(i, p) for i, p in enumerate(tasks.prompts) for _ in range(samples)]
    scores = np.zeros(len(tasks))
    batch = min(batch, len(rows))
    for s in range(0, len(rows), batch):
        piece = rows[s:s + batch]
        # The last piece padded with copies of its first prompt: one compiled program for all.
        prompts = [p for _, p in piece] + [piece[0][1]] * (batch - len(piece))
        new = sample(cfg, params, tok, prompts, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed + s)
        for (i, _), ids in zip(piece, new):
            scores[i] += reward(tok, ids, tasks.answers[i])
    return scores / samples


def make(kind: str, n: int, seed: int, digits: int = 2, chat: bool = False) -> list[dict]:
    """n distinct tasks of `kind` (see the module docstring) as task-file records."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose from {list(KINDS)}")
    if kind == "add":
        top = 10 ** digits
        space = [(f"{a}+{b}=", str(a + b)) for a in range(top) for b in range(top)]
    elif kind == "reverse":
        space = [(f"reverse {''.join(w)}:", "".join(reversed(w)))
                 for w in itertools.product("abcdefgh", repeat=digits)]
    else:
        top = 10 ** digits
        space = [(f"{a}?{b}", "<" if a < b else ">") for a in range(top) for b in range(top)
                 if a != b]
    if n > len(space):
        raise ValueError(f"only {len(space)} distinct {kind} tasks of {digits} digits; asked {n}")
    pick = np.random.default_rng(seed).choice(len(space), n, replace=False)
    recs = [{"prompt": space[i][0], "answer": space[i][1]} for i in pick]
    if chat:
        recs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                for r in recs]
    return recs
