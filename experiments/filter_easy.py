"""Drop the examples a judge model finds easy, as Meta did to Llama 4's SFT data (more than half
removed for Maverick, over 95% for Behemoth); keep the hardest.

    python -m experiments.filter_easy --judge CKPT --data chat.jsonl --out hard.jsonl --drop-fraction 0.5
    python -m experiments.filter_easy --judge CKPT --data tasks.jsonl --out hard.jsonl --samples 8

Chat records ({"messages": [...]}, SFT's format) are scored by the judge's mean loss on their
assistant turns; verifiable tasks ({"prompt", "answer"}, GRPO's format: training/tasks.py) by
their pass rate over --samples samples at --temperature, and a task's difficulty is 1 - that
rate. The floor(n * drop_fraction) easiest are dropped (ties: the later line goes first); the
kept lines are written unchanged, in their order, to OUT, and OUT.report.json lists every line
with its score and whether it was kept. Nothing is written when the input is bad.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def keep_hardest(difficulty: np.ndarray, drop_fraction: float) -> np.ndarray:
    """difficulty [n] -> kept [n] bool: all but the floor(n * drop_fraction) least difficult;
    among equal scores the later line is dropped first (a stable order keeps the earlier)."""
    if not 0 <= drop_fraction < 1:
        raise ValueError(f"--drop-fraction must be in [0, 1), got {drop_fraction}")
    n_drop = int(np.floor(len(difficulty) * drop_fraction))
    order = np.argsort(-np.asarray(difficulty, np.float64), kind="stable")  # hardest first
    kept = np.zeros(len(difficulty), bool)
    kept[order[:len(difficulty) - n_drop]] = True
    return kept


def _lines(path: str) -> list[str]:
    with open(path, "rb") as f:
        return [ln.decode("utf-8", "replace") for ln in f if ln.strip()]


def chat_losses(cfg, params, tok, path: str, seq: int, batch: int) -> np.ndarray:
    """The judge's mean loss on each record's assistant turns [n]."""
    from training.data import pad_rows
    from training.scoring import score_tokens
    from training.text import DataError, read_documents
    docs, kind = read_documents(tok, [path])
    if kind != "chat":
        raise DataError(f"{path}: expected chat records (.jsonl) or a task file")
    for n, d in enumerate(docs, 1):
        if len(d.ids) > seq + 1:
            raise DataError(f"{path}: record {n} is {len(d.ids)} tokens, more than --seq "
                            f"{seq} + 1; raise --seq")
    tokens, weights, _ = pad_rows(docs, seq, tok.special.get("pad", 0))
    logp = score_tokens(cfg, params, tokens, min(batch, len(docs)))
    w = weights[:, 1:]
    return -(logp * w).sum(-1) / w.sum(-1)


def _is_task_file(path: str) -> bool:
    for line in _lines(path)[:1]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(rec, dict) and "answer" in rec and "messages" not in rec
    return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--judge", required=True, help="checkpoint (HF dir, Orbax dir or a run dir)")
    ap.add_argument("--data", required=True, help="chat records or a task file (.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--drop-fraction", type=float, default=0.5)
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the judge's, else bytes)")
    ap.add_argument("--seq", type=int, default=512, help="longest chat record, in tokens")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4, help="tasks: samples per task")
    ap.add_argument("--temperature", type=float, default=1.0, help="tasks: sampling temperature")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tasks: tokens per sample")
    args = ap.parse_args(argv)
    try:
        keep_hardest(np.zeros(0), args.drop_fraction)  # the settings, before anything is read
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data!r} is not a file")
        _filter(args)
    except (ValueError, OSError) as e:  # DataError and ConfigError are ValueErrors
        sys.exit(f"error: {e}")


def _filter(args):
    from experiments.train import load_init
    from training import load_tokenizer
    from training import tasks as T
    from training.text import DataError
    tasks = _is_task_file(args.data)
    own = os.path.join(args.judge, "tokenizer.json")
    tok = load_tokenizer(args.tokenizer or (own if os.path.isfile(own) else None))
    cfg, params = load_init(args.judge)
    cfg = cfg.replace(dtype="float32")
    if tasks:
        ts = T.read_tasks(tok, args.data)
        rate = T.pass_rates(cfg, params, tok, ts, samples=args.samples,
                            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            batch=args.batch)
        score, difficulty, what = rate, 1 - rate, "pass_rate"
    else:
        score = difficulty = chat_losses(cfg, params, tok, args.data, args.seq, args.batch)
        what = "judge_loss"
    lines = _lines(args.data)
    if len(lines) != len(score):
        raise DataError(f"{args.data}: {len(lines)} lines but {len(score)} examples")
    kept = keep_hardest(difficulty, args.drop_fraction)
    report = {"judge": args.judge, "data": args.data, "score": what,
              "drop_fraction": args.drop_fraction, "kept": int(kept.sum()),
              "dropped": int((~kept).sum()),
              "lines": [{"line": n, what: float(s), "kept": bool(k)}
                        for n, (s, k) in enumerate(zip(score, kept), 1)]}
    for path, text in ((args.out, "".join(ln if ln.endswith("\n") else ln + "\n"
                                          for ln, k in zip(lines, kept) if k)),
                       (args.out + ".report.json", json.dumps(report, indent=1) + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(f"kept {report['kept']} of {len(lines)} ({what}); dropped the "
          f"{report['dropped']} easiest -> {args.out}, report {args.out}.report.json")


if __name__ == "__main__":
    main()
