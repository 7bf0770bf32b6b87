"""Write a file of generated verifiable tasks (GRPO's data; training/tasks.py says how each kind
is checked).

    python -m experiments.make_tasks add --n 500 --digits 2 --out tasks.jsonl [--chat] [--seed 0]
    python -m experiments.make_tasks reverse --n 200 --digits 3 --out tasks.jsonl

Each line is {"prompt": ..., "answer": ...}; --chat writes the prompt as one user message.
--split K writes the first K tasks to OUT and the rest to OUT's name with ".heldout" before its
suffix (disjoint: a held-out pass rate measures tasks never trained on).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def write_jsonl(path: str, records) -> None:
    """All lines or none: written beside `path`, then renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def heldout_path(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.heldout{ext}"


def main(argv=None):
    from training import tasks
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("kind", choices=tasks.KINDS)
    ap.add_argument("--n", type=int, required=True, help="tasks to write (distinct)")
    ap.add_argument("--digits", type=int, default=2, help="operand digits (add), letters (reverse)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="prompts as chat messages")
    ap.add_argument("--split", type=int, help="the first SPLIT tasks to OUT, the rest held out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.n < 1 or args.digits < 1 or (args.split is not None and not 0 < args.split < args.n):
        sys.exit("error: --n and --digits must be >= 1, and --split in 1..n-1")
    try:
        recs = tasks.make(args.kind, args.n, args.seed, args.digits, args.chat)
    except ValueError as e:
        sys.exit(f"error: {e}")
    cut = args.split or args.n
    write_jsonl(args.out, recs[:cut])
    if args.split:
        write_jsonl(heldout_path(args.out), recs[cut:])
    print(f"{cut} {args.kind} tasks -> {args.out}"
          + (f"; {args.n - cut} held out -> {heldout_path(args.out)}" if args.split else ""))


if __name__ == "__main__":
    main()
