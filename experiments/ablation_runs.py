"""Training and evaluating the runs of an ablation, resumably; writing its results.

A run's directory OUT/runs/<hash> holds the training run (checkpoints, metrics.jsonl), run.json
(what determines it, and the time spent on it, summed over sessions) and evals.json (the
evaluations done so far, or "diverged_at"). A run is read back when its training is finished and
the evaluations an ablation asks for are there; otherwise training resumes from its latest
checkpoint and the missing evaluations are done. A run is trained by one process at a time
(OUT/runs/<hash>.lock): two ablations started together that share a run (their reference) train
it once, the second waiting for the first and reading it back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np

import model
import training
from training import DivergedError, RunConfig
from training.checkpoint import model_record

from . import ablation_report as report
from . import evals, retrieval
from .ablations import Ablation, Size, Variant, base_config
from .quickstart import stdlib_files

HISTORY = ("step", "ce", "grad_norm", "tokens_per_s")  # what the report reads of metrics.jsonl


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _finite(obj):
    """obj with every NaN or infinite float as None (JSON has no NaN: null is "undefined",
    e.g. the mean of a metric no seed measured)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: str, obj):
    text = json.dumps(_finite(obj), indent=1, allow_nan=False)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a kill leaves the old file or the new one, never half


@contextlib.contextmanager
def _one_at_a_time(path: str, what: str):
    """Held while a process trains or evaluates the run; another one waits (its line says so)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: waiting for the other process working on this run", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class Runner:
    def __init__(self, size: Size, steps: int | None, out: str):
        self.size, self.steps, self.out = size, steps or size.steps, out
        self.tok = tok = training.byte_tokenizer()
        self.base = base_config(size, tok)
        train_files, eval_files = stdlib_files()
        docs, kind = training.read_documents(tok, train_files[:size.files])
        self.docs = docs
        self._rows = {False: training.pack(docs, kind, size.seq, tok.special["pad"])}
        self._fingerprints = {}
        self.data = evals.eval_data(tok, eval_files, size.seq, rows=size.eval_rows,
                                    long_rows=size.long_rows, per_depth=size.per_depth)

    def rows(self, with_retrieval: bool) -> training.Rows:
        """The text rows, plus passkey rows making up `retrieval_fraction` of all when asked."""
        if with_retrieval not in self._rows:
            text = self._rows[False]
            f = self.size.retrieval_fraction
            task = retrieval.training_rows(self.tok, retrieval.filler_tokens(self.docs),
                                           self.size.seq, round(len(text) * f / (1 - f)), seed=0)
            self._rows[True] = training.Rows(*(np.concatenate([getattr(text, a), getattr(task, a)])
                                               for a in ("tokens", "weights", "real")))
        return self._rows[with_retrieval]

    def settings(self, cfg, optim, seed: int, with_retrieval: bool) -> dict:
        if with_retrieval not in self._fingerprints:
            self._fingerprints[with_retrieval] = self.rows(with_retrieval).fingerprint()
        s = self.size
        return {"model": model_record(cfg), "optim": dataclasses.asdict(optim), "seed": seed,
                "batch": s.batch, "seq": s.seq, "data": {
                    "files": s.files, "fingerprint": self._fingerprints[with_retrieval],
                    "passkey_fraction": s.retrieval_fraction if with_retrieval else 0.0},
                "eval": {"rows": s.eval_rows, "long_rows": s.long_rows,
                         "per_depth": s.per_depth, "batch": s.eval_batch}}

    def run(self, ablation: Ablation, v: Variant, seed: int, tag: str) -> dict:
        cfg = v.config(self.base)
        optim = v.optim_config(self.size.optim_config(self.steps))
        settings = self.settings(cfg, optim, seed, ablation.retrieval)
        out = os.path.join(self.out, "runs", run_key(settings))
        os.makedirs(out, exist_ok=True)
        what = f"{tag} {ablation.name} {v.name} seed {seed}"
        with _one_at_a_time(out + ".lock", what):
            return self._run(ablation, v, seed, what, cfg, optim, settings, out)

    def _run(self, ablation: Ablation, v: Variant, seed: int, what: str, cfg, optim,
             settings: dict, out: str) -> dict:
        info = _read_json(os.path.join(out, "run.json")) or {
            "settings": settings, "train_s": 0.0, "eval_s": 0.0, "cpu_s": 0.0, "loads": []}
        info["used_by"] = sorted(set(info.get("used_by", [])) | {f"{ablation.name}/{v.name}"})
        have = _read_json(os.path.join(out, "evals.json"))
        need = [e for e in ablation.evals if e not in have]
        done_now = False
        progress = _Progress(what, optim.steps)
        finished = _finished(out, optim.steps)
        if "diverged_at" not in have and (need or not finished):
            done_now = True
            info["loads"].append(round(os.getloadavg()[0], 2))
            cpu0 = time.process_time()  # CPU seconds: what a run costs whatever the machine's load
            params = None
            if not finished:
                t0 = time.time()
                run = RunConfig(out=out, batch=self.size.batch, seq=self.size.seq, seed=seed,
                                save_every=self.size.save_every, keep=1, resume=True,
                                progress=False)
                try:
                    state, _ = training.train(
                        cfg, lambda: model.init_params(cfg, jax.random.key(seed)),
                        self.rows(ablation.retrieval), run, optim,
                        {"kind": "text", "tokenizer": "bytes"}, on_step=progress.step)
                    params = state["params"]
                except DivergedError:
                    have["diverged_at"] = len(training.read_metrics(out)) + 1
                info["train_s"] += time.time() - t0
            if "diverged_at" not in have and need:
                t0 = time.time()
                params = params if params is not None else training.load_params(out)[1]
                have |= evals.evaluate(cfg, params, self.data, need, self.size.eval_batch,
                                       self.size.one_length_retrieval)
                info["eval_s"] += time.time() - t0
            info["cpu_s"] += time.process_time() - cpu0
            _write_json(os.path.join(out, "evals.json"), have)
        _write_json(os.path.join(out, "run.json"), info)
        history = [{k: m[k] for k in HISTORY} for m in training.read_metrics(out)]
        record = have | {"history": history, "stability": evals.stability(history, optim.warmup),
                         "tokens_per_s": evals.throughput(history), **evals.parameters(cfg),
                         "dir": out, "seed": seed, "train_s": info["train_s"],
                         "eval_s": info["eval_s"], "cpu_s": info["cpu_s"], "loads": info["loads"]}
        progress.done(record, fresh=done_now)
        return record

    def ablation(self, ablation: Ablation, seeds: int, results: str, cmd: str):
        runs = {v.name: [] for v in ablation.variants}
        total = len(ablation.variants) * seeds
        for i, (v, seed) in enumerate((v, s) for v in ablation.variants for s in range(seeds)):
            runs[v.name].append(self.run(ablation, v, seed, f"[{i + 1}/{total}]"))
        write_results(ablation, runs, results, cmd, self)


def _finished(out: str, steps: int) -> bool:
    if not any(n.isdigit() for n in os.listdir(out)):
        return False
    ckpt = training.Checkpointer(out, save_every=1, keep=None, use_async=False)
    try:
        return ckpt.latest_step() == steps
    finally:
        ckpt.close()


class _Progress:
    """One line per run: rewritten in place at every step on a terminal, printed once done."""

    def __init__(self, what: str, steps: int):
        self.what, self.steps = what, steps
        self.tty = sys.stderr.isatty()

    def step(self, rec: dict):
        if self.tty:
            print(f"\r{self.what}: step {rec['step']}/{self.steps} loss "
                  f"{rec['ce'] / math.log(2):.3f} bpb, {rec['tokens_per_s']:,.0f} tok/s",
                  end="", file=sys.stderr, flush=True)

    def done(self, r: dict, fresh: bool):
        h = r["history"]
        last = f"step {h[-1]['step']}/{self.steps} loss {h[-1]['ce'] / math.log(2):.3f} bpb" if h \
            else "no steps"
        state = (f", DIVERGED at step {r['diverged_at']}" if "diverged_at" in r else "")
        when = "" if fresh else " (done earlier)"
        print(f"\r{self.what}: {last}, {r['tokens_per_s']:,.0f} tok/s, train {r['train_s']:.0f} s,"
              f" eval {r['eval_s']:.0f} s{state}{when}", file=sys.stderr, flush=True)


def _code_version() -> str:
    """The commit of the checkout this code is in (whatever the working directory), "-dirty"
    when tracked files other than results differ from it (the results files an ablation run
    writes do not make the code that wrote them dirty); "unknown" outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                        check=True, cwd=root).stdout.strip()
        rev = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)experiments/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if changed else "")


def write_results(ablation: Ablation, runs: dict[str, list[dict]], results: str, cmd: str,
                  runner: Runner):
    os.makedirs(results, exist_ok=True)
    stats = report.summarize(ablation, runs)
    every = [r for rs in runs.values() for r in rs]
    seconds = sum(r["train_s"] + r["eval_s"] for r in every)
    cpu = sum(r["cpu_s"] for r in every)
    loads = [x for r in every for x in r["loads"]]
    context = {"command": cmd, "code": _code_version(), "size": runner.size,
               "steps": runner.steps, "seeds": len(next(iter(runs.values()))),
               "minutes": seconds / 60, "cpu_minutes": cpu / 60,
               "load": (min(loads), max(loads)) if loads else None,
               "base": runner.base.text}
    path = os.path.join(results, ablation.name)
    with open(path + ".md", "w") as f:
        f.write(report.markdown(ablation, stats, context))
    report.figure(ablation, runs, runner.size.seq, path + ".png")
    _write_json(path + ".json", {
        "command": cmd, "code": context["code"], "minutes": round(context["minutes"], 1),
        "cpu_minutes": round(context["cpu_minutes"], 1),
        "stats": {v: {m: dataclasses.asdict(s) for m, s in ms.items()} for v, ms in stats.items()},
        "runs": [{"variant": v, "seed": r["seed"], "dir": r["dir"],
                  "first_loss": r["history"][0]["ce"] if r["history"] else None,
                  "last_loss": r["history"][-1]["ce"] if r["history"] else None,
                  **({"diverged_at": r["diverged_at"]} if "diverged_at" in r else {})}
                 for v, rs in runs.items() for r in rs]})
