"""The training loop: memory check, resume, steps with a progress bar, metrics log, checkpoints.

A run directory holds the Orbax checkpoints (see checkpoint.py) and `metrics.jsonl`, one line per
step: {"step": s, "loss": ..., "ce": ..., "aux": ..., "load": [[f_e per expert] per MoE layer],
"grad_norm", "lr", "tokens_per_s"} (other objectives log their own: training.objectives), where
step s is the s-th update and its loss was measured on the parameters before that update. On
resume, lines past the restored step (written by the killed run after its last checkpoint) are
dropped, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import model
from model.config import Config
import sharding

from . import memory
from .checkpoint import Checkpointer, ResumeError, check_resumable, model_record
from .data import Rows
from .progress import Progress
from .settings import SettingsError, require_int
from .objectives import SFT
from .step import OptimConfig, init_state, make_optimizer, make_train_step


@dataclass(frozen=True)
class RunConfig:
    out: str                   # run directory: checkpoints and metrics.jsonl
    batch: int = 8             # rows per step
    seq: int = 256             # tokens per row (the model reads seq, is scored on seq)
    seed: int = 0              # data order and PRNG
    save_every: int = 100
    keep: int = 3
    resume: bool = False
    stop_at: int | None = None  # stop (and save) after this step; the schedule still runs to steps
    async_save: bool = True
    progress: bool = True
    log_every: int | None = None  # off a terminal, a progress line every this many steps
    mesh: str | None = None    # e.g. "data=2,fsdp=4": train sharded over these devices (sharding/)
    rules: str = "combined"    # the sharding strategy's rules (sharding.rules)

    def __post_init__(self):
        for field in ("batch", "seq", "save_every", "keep"):  # keep 0 would delete the final state
            require_int(self, field, 1)
        require_int(self, "stop_at", 1, optional=True)
        require_int(self, "log_every", 1, optional=True)
        require_int(self, "seed", 0)


class DivergedError(RuntimeError):
    """The loss, gradients or updated weights stopped being finite; the message names the step,
    and the run's latest checkpoint is the last one saved before it (every saved state is finite)."""


def check_run(cfg, run: RunConfig):
    """What RunConfig alone cannot check: the rows fit the model's positions."""
    if run.seq > cfg.text.max_position_embeddings:
        raise SettingsError(f"seq (--seq) {run.seq} exceeds the model's "
                            f"{cfg.text.max_position_embeddings} positions "
                            "(max_position_embeddings)")


def _metrics_path(run: RunConfig) -> str:
    return os.path.join(run.out, "metrics.jsonl")


def read_metrics(out: str) -> list[dict]:
    """The records of OUT/metrics.jsonl. A last line cut short (a kill mid-write) is dropped;
    any other line that is not JSON is an error naming it."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # JSONDecodeError, or bytes cut inside a UTF-8 character
            if n == len(lines):  # no newline after it: the write was cut short
                break
            raise ResumeError(f"{path}:{n}: not a metrics record (not valid JSON); "
                              "remove the line to resume") from None
    return out


def _truncate_metrics(run: RunConfig, step: int):
    """Keep the records up to `step`; replaced whole, so a kill here loses nothing."""
    kept = [m for m in read_metrics(run.out) if m["step"] <= step]
    tmp = _metrics_path(run) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(tmp, _metrics_path(run))


def _diverged(step: int, finite, m: dict, ckpt: Checkpointer):
    what = [w for w, ok in zip(("the loss", "the gradients", "the updated weights"), finite)
            if not ok]
    ckpt.wait()  # a save in flight is of an earlier, finite state
    latest = ckpt.latest_step()
    kept = (f"the latest checkpoint, step {latest}, is the last one before it" if latest
            else "no checkpoint was saved before it")
    raise DivergedError(f"step {step}: not finite: {' and '.join(what)} (loss {m['loss']:.4g}, "
                        f"gradient norm {m['grad_norm']:.4g}, lr {m['lr']:.4g}); training stopped "
                        f"without applying the step, and {kept}. Lower --lr (or --weight-decay) "
                        "and start a new run.")


def _batch_axes(ndim: int) -> tuple[str, ...]:
    """Logical axes of a batch array: rows, then positions (per-row values have no positions)."""
    return ("batch", "seq")[:ndim]


def _abstract_batch(source, plan=None):
    def struct(shape, dtype):
        sh = None if plan is None else plan.sharding(_batch_axes(len(shape)), shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    return {k: struct(shape, dtype) for k, (shape, dtype) in source.abstract().items()}


def _place_frozen(objective, plan):
    """The params of the models the objective reads but does not train, placed like the
    policy's: on the first device, or split over the mesh by the policy's rules (applied to
    their own config: see training.distill)."""
    if plan is None:
        return {k: jax.device_put(p) for k, (_, p) in objective.frozen().items()}
    return {k: sharding.shard_params(c, p, plan.mesh, plan.rules)
            for k, (c, p) in objective.frozen().items()}


def state_shardings(abstract_state, param_shardings, mesh):
    """Shardings for the train state: the params, and every optimizer leaf that mirrors a
    parameter (Adam's moments), as the parameter is split; the rest (step, counts, PRNG)
    replicated. A leaf mirrors the parameter whose path ends its own path of dict keys."""
    by_path = {tuple(k.key for k in path): sh
               for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        return next((by_path[tuple(keys[i:])] for i in range(len(keys))
                     if tuple(keys[i:]) in by_path), replicated)
    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def train(cfg: Config, make_params: Callable[[], dict], rows: Rows, run: RunConfig,
          optim: OptimConfig, data_info: dict | None = None, tokenizer=None,
          on_step: Callable[[dict], None] | None = None,
          on_start: Callable[[str], None] | None = None, objective=None):
    """Train to `optim.steps`, resuming from run.out's latest checkpoint when run.resume.
    `make_params()` is called only when starting fresh; `tokenizer` (a model.tokenizer.Tokenizer)
    is saved as OUT/tokenizer.json; `on_start(OUT)` is called once OUT is known to be this run's,
    before the first step (experiments.train copies its --init's non-weight files there).
    `objective` (training.objectives; SFT by default) says what `rows` are and what the step
    minimises. Returns (state, metrics of this call)."""
    objective = objective or SFT()
    check_run(cfg, run)
    plan = None
    if run.mesh is not None:  # a bad mesh or rules fail here, before anything is written
        plan = sharding.make_plan(cfg, sharding.make_mesh(run.mesh), run.rules, batch=run.batch,
                                  seq=run.seq)
    memory.check_estimate(cfg, run.batch * objective.rows_per_item, run.seq,
                          1 if plan is None else plan.mesh.size)
    os.makedirs(run.out, exist_ok=True)
    ckpt = Checkpointer(run.out, run.save_every, run.keep, run.async_save)
    try:
        return _train(cfg, make_params, rows, run, optim, data_info or {}, tokenizer, on_step,
                      on_start, ckpt, plan, objective)
    finally:
        ckpt.close()


def _train(cfg: Config, make_params, rows, run, optim, data_info, tokenizer, on_step, on_start,
           ckpt, plan, objective):
    opt = make_optimizer(optim)
    meta = model_record(cfg) | {
        "data": {"fingerprint": rows.fingerprint(), "rows": len(rows), "seq_len": run.seq,
                 "batch_size": run.batch, "seed": run.seed, **data_info},
        "optim": dataclasses.asdict(optim)}
    if objective.record() is not None:
        meta["objective"] = objective.record()
    abstract = jax.eval_shape(lambda p: init_state(p, opt, run.seed), model.param_shapes(cfg))
    shardings = None
    if plan is not None:
        shardings = state_shardings(
            abstract, sharding.param_shardings(cfg, plan.mesh, run.rules), plan.mesh)
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                abstract, shardings)
    latest = ckpt.latest_step()
    if latest is not None and not run.resume:
        raise ResumeError(f"{run.out} already holds checkpoints (latest step {latest}); pass "
                          "--resume to continue that run, or choose a new --out directory")
    if latest is not None:
        check_resumable(ckpt.meta(latest), meta, run.out)
        state, saved = ckpt.restore(abstract, latest)
        _truncate_metrics(run, latest)
        print(f"resuming {run.out} from step {latest}", file=sys.stderr)
    else:
        if run.resume:
            print(f"{run.out} holds no checkpoint to resume from: starting from scratch",
                  file=sys.stderr)
        if os.path.exists(_metrics_path(run)):
            os.remove(_metrics_path(run))
        state = init_state(make_params(), opt, run.seed)
        if shardings is not None:
            state = jax.device_put(state, shardings)
    if on_start is not None:
        on_start(run.out)
    if tokenizer is not None:
        tokenizer.tk.save(os.path.join(run.out, "tokenizer.json"))
    start = int(state["step"])
    end = optim.steps if run.stop_at is None else min(run.stop_at, optim.steps)

    source = objective.source(cfg, rows, run, plan)
    if latest is not None:
        source.restore(saved)
    frozen = _place_frozen(objective, plan)
    print(f"compiling the train step ({run.batch} x {run.seq} tokens)...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    step_fn = make_train_step(cfg, optim, plan=plan, state_shardings=shardings,
                              objective=objective).lower(
        abstract, _abstract_batch(source, plan), frozen).compile()
    print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def put(batch):  # one device, or split over the mesh's batch axes
        if plan is None:
            return jax.device_put(batch)
        return {k: plan.put(v, _batch_axes(np.ndim(v))) for k, v in batch.items()}
    memory.check_compiled(step_fn, run.batch, run.seq)
    history = []
    bar = Progress(optim.steps, start, run.progress, run.log_every,
                   cfg.text.num_experts if cfg.text.moe_layers else 0, tokenizer)
    tokens_per_step = run.batch * objective.rows_per_item * run.seq
    with open(_metrics_path(run), "a") as log:
        for s in range(start, end):
            t0 = time.perf_counter()
            state, m = step_fn(state, put(source.batch_at(s, state["params"])), frozen)
            m = jax.device_get(m)
            finite = m.pop("finite")
            if not finite.all():  # the step left the state as it was; stop before saving more
                _diverged(s + 1, finite, m, ckpt)
            dt = time.perf_counter() - t0
            rec = {"step": s + 1, **{k: float(v) for k, v in m.items() if k != "load"},
                   "tokens_per_s": tokens_per_step / dt}
            if "load" in m:
                rec["load"] = np.round(m["load"], 4).tolist()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            history.append(rec)
            bar.update(rec, m.get("load"))
            ckpt.save(s + 1, state, meta | {"step": s + 1, **source.position(s + 1)})
            if on_step is not None:
                on_step(rec)
    bar.close()
    if end > start:
        ckpt.save(end, state, meta | {"step": end, **source.position(end)}, force=True)
    ckpt.wait()
    return state, history
