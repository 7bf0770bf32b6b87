"""Training runs read as checkpoints.

A run directory of `experiments.train` (written by training/checkpoint.py) holds OUT/<step>/state
(the train state: params, optimizer state, step, PRNG key), OUT/<step>/meta (the record below),
OUT/tokenizer.json and the other non-weight files (checkpoints.assets). The run directory stands
for its latest step, OUT/<step> for that step; only the parameters are read. A run has no
integrity record: Orbax writes each step beside its place and renames it when complete.

The record is written and read here, so that both sides of the format sit in one file:
{"model": the config as HF config.json fields, "compute": dtype, param_dtype, remat, ...}.
"""
from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from checkpoints import orbax_io
from checkpoints import keys as K
from checkpoints.errors import CheckpointError, quiet_orbax
from model.config import Config, ConfigError, from_hf, split_variant, to_hf

STATE, META = "state", "meta"   # the items of a step (training.checkpoint.Checkpointer)


def model_record(cfg: Config) -> dict:
    """The model part of a step's meta: HF config.json fields, and for an ablation variant the
    fields HF has none for ("variant"), so that it reads back as itself, not as Llama 4."""
    llama4, variant = split_variant(cfg)
    return {"model": to_hf(llama4), **({"variant": variant} if variant else {}),
            "compute": {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat}}


def config_from_meta(meta: dict, where: str = "checkpoint meta") -> Config:
    cfg = from_hf(meta["model"], where).replace(**meta["compute"])
    return cfg.replace_text(**meta.get("variant", {}))


def is_step(path: Path) -> bool:
    return path.name.isdigit() and (path / STATE).is_dir() and (path / META).is_dir()


def step_dir(path: Path) -> Path | None:
    """The step `path` stands for: itself if it is one, the latest step of a run directory;
    None when it is neither. Steps still being written have other names (Orbax's temporary
    ones) and are not seen."""
    if is_step(path):
        return path
    steps = [p for p in path.iterdir() if is_step(p)] if path.is_dir() else []
    return max(steps, key=lambda p: int(p.name), default=None)


def run_dir(step: Path) -> Path:
    """The run directory of a step: where its tokenizer and other non-weight files are."""
    return step.parent


def read_config(step: Path) -> Config:
    """The model config a step was trained with (the compute settings included)."""
    where = step / META
    try:
        with quiet_orbax(), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            meta = ckptr.restore(where.absolute())
        return config_from_meta(meta, str(where))
    except (OSError, ValueError, KeyError, TypeError) as e:  # ConfigError is a ValueError
        detail = e if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{where}: not a training run's record ({detail})") from None


def open_params(step: Path, cfg: Config) -> orbax_io.Stores:
    """Every parameter of a step, opened unread, held against the config (every mismatch at
    once); the optimizer state is not touched."""
    try:
        stores = orbax_io.open_lazy(step / STATE)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step / STATE} is not a readable Orbax checkpoint "
                              f"({orbax_io.reason(e)})") from None
    params = {p[1:]: t for p, t in stores.items() if p[0] == "params"}
    K.check({"/".join(p): s for p, s in K.param_shapes(cfg).items()},
            {"/".join(p): tuple(t.shape) for p, t in params.items()}, str(step))
    return params


def restore_params(step: Path, cfg: Config, dtype, shardings: dict) -> dict:
    """The parameters of a step as jax.Arrays, each leaf read straight into its sharding."""
    shapes = K.param_shapes(cfg)
    return orbax_io.restore(step / STATE, shapes, dict.fromkeys(shapes, dtype), shardings,
                            under=("params",), where=step)
