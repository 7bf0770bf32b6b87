"""Training checkpoints: an Orbax CheckpointManager holding the train state and a JSON record.

Layout: DIR/<step>/state (params, opt_state, step, rng) and DIR/<step>/meta (the model config as
HF config.json fields and, for an ablation variant, "variant": the fields HF has none for; the
data position and fingerprint, batch, seed, optimizer settings).
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact; a resume refuses a directory written by a
different config or data before it writes anything. `checkpoints.load`, `python -m
checkpoints.convert` and `experiments.generate --ckpt` read a run directory (its latest step) or
one step as a checkpoint (checkpoints/runs.py).
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from checkpoints.runs import model_record  # beside its reader: the format in one place


class ResumeError(ValueError):
    """A checkpoint directory that does not belong to this run; the message names the difference."""


# Meta entries that may differ on resume: compute settings (dtype, remat) and the position
# (of the data order, or of GRPO's prompt sampler: training.grpo).
_MAY_CHANGE = ("compute", "step", "rows_consumed", "sampler")


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


class Checkpointer:
    def __init__(self, directory: str, save_every: int, keep: int, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=use_async))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        if not force and step % self.save_every:
            return False
        if step in self._mgr.all_steps():
            return False
        return self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state, step: int | None = None):
        step = self.latest_step() if step is None else step
        # Leaves go where the abstract state says (shards of a mesh), else to the first device.
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=getattr(a, "sharding", None) or _one_device()), abstract_state)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self):
        self._mgr.wait_until_finished()

    def close(self):
        self._mgr.close()


def check_resumable(saved: dict, current: dict, directory: str):
    """Raise ResumeError naming every field where the saved run differs from this one."""
    diffs = []

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        elif a != b:
            diffs.append(f"{where}: checkpoint has {a!r}, this run has {b!r}")

    walk({k: v for k, v in saved.items() if k not in _MAY_CHANGE},
         {k: v for k, v in current.items() if k not in _MAY_CHANGE}, "")
    if diffs:
        raise ResumeError(f"cannot resume from {directory}: it was written by a different run:\n  "
                          + "\n  ".join(diffs) + "\nUse a new --out directory, or the same settings.")


def load_params(directory: str):
    """(cfg, params) of the latest checkpoint of a training run directory, or of one step of it
    (OUT/<step>); the optimizer state is not read. `checkpoints.load` reads runs like any other
    checkpoint; this is that call."""
    import checkpoints
    return checkpoints.load(directory)
