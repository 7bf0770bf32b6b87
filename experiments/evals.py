"""Evaluations of a Llama 4 text model, on any checkpoint (what the ablations report).

    python -m experiments.evals heldout|positions|retrieval|all --ckpt DIR [--seq T] [--json OUT]
    python -m experiments.evals retrieval --ckpt DIR --lengths 1024,4096 --depths 0,0.5,1

DIR: a training run directory (experiments/train.py, the ablations), an Orbax or an HF
directory; its tokenizer.json is used when it has one, else bytes. T, the training length, is
read from a run directory's record and must be given otherwise. The data are the held-out
standard-library files of the quickstart (or --data FILES).

- heldout: loss in bits per byte on rows of T tokens (nats per token / ln 2 x tokens per byte of
  the text), and from the same pass the MoE health: each expert's share of the token copies per
  MoE layer, the load-balance entropy (1 = every expert equally loaded), dead experts (under a
  tenth of an equal share).
- positions: one pass over rows of 16 T tokens, the loss in bits per byte by position: "1x" is
  positions [T/2, T) (a full context, inside the training length), "Nx" positions [NT/2, NT).
- retrieval: passkey accuracy (experiments/retrieval.py), exact match of the key, at lengths
  T .. 16 T (or --lengths, in tokens: no T needed then) and five depths (or --depths).
A run directory also gives `stability` (loss spikes, largest gradient norm after warmup) and
`throughput` (median training tokens per second) from its metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass

import jax
import numpy as np

import model
import training
from model.config import Config, param_count
from training.step import eval_step
from training.text import text_document

from . import retrieval

MULTIPLES = (1, 2, 4, 8, 16)
EVALS = ("heldout", "positions", "retrieval")
DEAD = 0.1           # an expert with under this fraction of an equal share of the copies is dead
SPIKE = 1.15         # a loss spike: this many times the median loss of the steps before it
SPIKE_WINDOW = 20


@dataclass
class EvalData:
    """What the evaluations read, made once and shared by every run that is compared."""
    seq: int
    heldout: training.Rows               # [R, T + 1]
    long: training.Rows                  # [R', 16 T + 1]
    retrieval: dict[int, retrieval.Examples]
    tokens_per_byte: float
    pad_id: int


def eval_data(tok, files: list[str], seq: int, *, rows: int, long_rows: int, per_depth: int,
              lengths=None, depths=retrieval.DEPTHS) -> EvalData:
    """Held-out rows of T and of 16 T tokens (evenly spread over the packed text, at most `rows`
    and `long_rows`), passkey examples with these files as the filler (`per_depth` per length
    and depth; lengths T .. 16 T unless given)."""
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    docs = [text_document(tok, t) for t in texts if t.strip()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts if t.strip())
    pad = tok.special.get("pad", 0)
    lengths = lengths or [m * seq for m in MULTIPLES]
    return EvalData(seq, _spread(training.pack(docs, "text", seq, pad), rows),
                    _spread(training.pack(docs, "text", MULTIPLES[-1] * seq, pad), long_rows),
                    retrieval.grid(tok, retrieval.filler_tokens(docs), lengths, per_depth, depths),
                    sum(len(d.ids) - 1 for d in docs) / n_bytes, pad)


def _spread(rows: training.Rows, n: int) -> training.Rows:
    idx = np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)
    return training.Rows(rows.tokens[idx], rows.weights[idx], rows.real[idx])


def heldout(cfg: Config, params, data: EvalData, batch: int) -> dict:
    nats = targets = 0.0
    load, real = 0.0, 0
    rows = data.heldout
    for (tokens, n), (w, _), (r, _) in zip(*(retrieval.batches(a, batch) for a in
                                             (rows.tokens, rows.weights, rows.real))):
        w, r = w.copy(), r.copy()
        w[n:], r[n:] = 0, False  # the padding rows count for nothing
        m = jax.device_get(eval_step(cfg, params, {"tokens": tokens, "weights": w, "real": r}))
        nats, targets = nats + float(m["ce"] * m["targets"]), targets + float(m["targets"])
        if "load" in m:
            k = int(r[:, :-1].sum())
            load, real = load + np.asarray(m["load"]) * k, real + k
    out = {"bits_per_byte": nats / targets / math.log(2) * data.tokens_per_byte}
    if real:
        out |= moe_health(load / real)
    return out


def moe_health(load: np.ndarray) -> dict:
    """load [L, E]: each MoE layer's share of token copies per expert (rows sum to 1)."""
    E = load.shape[-1]
    p = np.clip(load, 1e-12, None)
    entropy = -(load * np.log(p)).sum(-1) / math.log(E) if E > 1 else np.ones(len(load))
    return {"load": np.round(load, 4).tolist(), "balance_entropy": float(entropy.mean()),
            "dead_experts": int((load < DEAD / E).sum()), "max_load": float(load.max() * E)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    # On the host: a jitted one would compile once per shape, for a few milliseconds of work.
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def positions(cfg: Config, params, data: EvalData, batch: int) -> dict:
    T = data.seq
    rows = data.long
    total, count = np.zeros(rows.tokens.shape[1] - 1), np.zeros(rows.tokens.shape[1] - 1)
    for (ids, n), (w, _) in zip(retrieval.batches(rows.tokens, batch),
                                retrieval.batches(rows.weights, batch)):
        logp = _log_softmax(np.asarray(model.forward(cfg, params, ids[:, :-1]))[:n])
        nll = -np.take_along_axis(logp, ids[:n, 1:, None], axis=-1)[..., 0]
        total += (nll * w[:n, 1:]).sum(0)
        count += w[:n, 1:].sum(0)
    bits = lambda a, b: float(total[a:b].sum() / count[a:b].sum() / math.log(2)  # noqa: E731
                              * data.tokens_per_byte)
    # Position j of the logits predicts token j + 1: it has seen j + 1 tokens.
    out = {f"{m}x": bits(m * T // 2, m * T) for m in MULTIPLES}
    window = max(T // 4, 1)
    out["curve"] = [bits(a, a + window) for a in range(0, len(total), window)]
    out["curve_window"] = window
    return out


def retrieval_accuracy(cfg: Config, params, data: EvalData, batch: int,
                       one_length: bool = False) -> dict:
    """retrieval.score's record, plus {"1x": accuracy at T, ...} (lengths as multiples of T)."""
    out = retrieval.score(lambda ids: model.forward(cfg, params, ids), data.retrieval, batch,
                          data.pad_id, one_length)
    return out | {f"{n // data.seq}x": a for n, a in zip(out["lengths"], out["accuracy"])
                  if n % data.seq == 0}


def stability(history: list[dict], warmup: int) -> dict:
    """Loss spikes (a step's loss over SPIKE x the median of the SPIKE_WINDOW steps before it)
    and the largest gradient norm, both after warmup (early steps fall steeply by nature)."""
    loss = [m["ce"] for m in history]
    start = max(warmup, SPIKE_WINDOW)
    spikes = sum(loss[s] > SPIKE * statistics.median(loss[s - SPIKE_WINDOW:s])
                 for s in range(start, len(loss)))
    norms = [m["grad_norm"] for m in history[warmup:]] or [math.nan]
    return {"loss_spikes": int(spikes), "max_grad_norm": float(max(norms))}


def throughput(history: list[dict]) -> float:
    """Median training tokens per second, the first (compiling) step left out."""
    return float(statistics.median(m["tokens_per_s"] for m in history[1:] or history))


def parameters(cfg: Config) -> dict:
    c = param_count(cfg)
    return {"params_total": c["text"], "params_active": c["text_active"]}


EVAL_FNS = {"heldout": heldout, "positions": positions, "retrieval": retrieval_accuracy}


def evaluate(cfg: Config, params, data: EvalData, evals=EVALS, batch: int = 8,
             one_length: bool = False) -> dict:
    """The evaluations named; `one_length`: retrieval at one padded length (see there)."""
    kw = {"retrieval": {"one_length": one_length}}
    return {name: EVAL_FNS[name](cfg, params, data, batch, **kw.get(name, {})) for name in evals}


# ---- command line ------------------------------------------------------------------------------

def _run_record(path: str) -> dict | None:
    """The latest checkpoint's record of a training run directory; None for other checkpoints."""
    if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return None
    ckpt = training.Checkpointer(path, save_every=1, keep=None, use_async=False)
    try:
        return ckpt.meta()
    finally:
        ckpt.close()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("eval", choices=(*EVALS, "all"), help="what to evaluate (all: every one)")
    ap.add_argument("--ckpt", required=True,
                    help="training run directory, Orbax directory or HF directory")
    ap.add_argument("--seq", type=int, help="training length T (default: the run's)")
    ap.add_argument("--data", nargs="+", help="held-out text files (default: the quickstart's)")
    ap.add_argument("--rows", type=int, default=64, help="heldout: rows of T tokens")
    ap.add_argument("--long-rows", type=int, default=16, help="positions: rows of 16 T tokens")
    ap.add_argument("--lengths", type=_ints, help="retrieval: comma-separated context lengths in "
                    "tokens (default: T, 2T, 4T, 8T, 16T)")
    ap.add_argument("--depths", type=_floats, default=list(retrieval.DEPTHS),
                    help="retrieval: comma-separated needle depths in [0, 1] (default: "
                    f"{','.join(map(str, retrieval.DEPTHS))})")
    ap.add_argument("--per-depth", type=int, default=4, help="retrieval: examples per length "
                    "and depth")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    return ap


def _check(args, record):
    """The training length, or one clear error about the arguments."""
    seq = args.seq or (record or {}).get("data", {}).get("seq_len")
    if seq is None and not (args.eval == "retrieval" and args.lengths):
        raise ValueError(f"{args.ckpt} is not a training run: give its training length, --seq")
    if seq is not None and seq < 2:
        raise ValueError(f"--seq must be at least 2, got {seq}")
    for name in ("batch", "rows", "long_rows", "per_depth"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.lengths is not None and (not args.lengths or min(args.lengths) < 2):
        raise ValueError(f"--lengths must be context lengths of at least 2 tokens, "
                         f"got {args.lengths}")
    if not args.depths or not all(0 <= d <= 1 for d in args.depths):
        raise ValueError(f"--depths must be fractions in [0, 1], got {args.depths}")
    return seq or min(args.lengths)


def main(argv=None):
    from checkpoints import CheckpointError
    from experiments.quickstart import stdlib_files
    from experiments.train import load_init
    args = build_parser().parse_args(argv)
    evals = EVALS if args.eval == "all" else (args.eval,)
    try:
        if not os.path.isdir(args.ckpt):
            raise ValueError(f"--ckpt {args.ckpt}: not a checkpoint directory")
        record = _run_record(args.ckpt)
        seq = _check(args, record)
        cfg, params = load_init(args.ckpt)
        tok_path = os.path.join(args.ckpt, "tokenizer.json")
        tok = training.load_tokenizer(tok_path if os.path.isfile(tok_path) else None)
        files = args.data or stdlib_files()[1]
        data = eval_data(tok, files, seq, rows=args.rows, long_rows=args.long_rows,
                         per_depth=args.per_depth, lengths=args.lengths, depths=args.depths)
        results = {"checkpoint": args.ckpt, "seq": seq, **parameters(cfg),
                   **evaluate(cfg, params, data, evals, args.batch)}
    except (ValueError, OSError, CheckpointError) as e:  # ConfigError, DataError too
        sys.exit(f"error: {e}")
    if record is not None:
        history = training.read_metrics(args.ckpt)
        results |= {"stability": stability(history, record["optim"]["warmup"]),
                    "tokens_per_s": throughput(history)}
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
