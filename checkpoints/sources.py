"""What a checkpoint path is, and where its non-weight files are.

Three kinds are read wherever a checkpoint is (`checkpoints.load`, `python -m checkpoints.convert`,
`experiments.generate --ckpt`, `experiments.train --init`):
- "hf": config.json plus model.safetensors, or shards with model.safetensors.index.json;
- "orbax": what `checkpoints.convert` and `checkpoints.save` write (checkpoint.json, params/);
- "run": a training run directory of `experiments.train` or one of its steps (checkpoints.runs).
"""
from __future__ import annotations

from pathlib import Path

from checkpoints import hf, orbax_io, runs
from checkpoints.errors import CheckpointError


def kind(path: Path) -> str:
    """"hf", "orbax" or "run"; one CheckpointError saying what each kind holds otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if orbax_io.is_orbax_dir(path):
        return "orbax"
    if hf.is_hf_dir(path):
        return "hf"
    if runs.step_dir(path) is not None:
        return "run"
    raise CheckpointError(
        f"{path} is not a checkpoint: an HF directory holds config.json and {hf.SINGLE} (or "
        f"{hf.INDEX} and its shards), an Orbax one {orbax_io.META} and {orbax_io.PARAMS}/, a "
        "training run <step>/state and <step>/meta")


def asset_dir(path: Path) -> Path:
    """The directory holding the checkpoint's tokenizer and other non-weight files
    (checkpoints.assets): the checkpoint itself, or a run's directory for a run or a step."""
    path = Path(path)
    return runs.run_dir(runs.step_dir(path)) if kind(path) == "run" else path
