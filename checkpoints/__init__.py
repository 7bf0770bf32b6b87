"""Checkpoints: the HF key table, HF <-> params conversion, Orbax save and restore.

    cfg, params = checkpoints.load(path)     # an HF directory, one of our Orbax directories,
                                             # or a training run (its latest step) or one step
    checkpoints.save(path, cfg, params)      # in-memory params -> Orbax directory
    checkpoints.save_hf(path, cfg, params)   # in-memory params -> HF directory
    python -m checkpoints.convert SRC DST [--dtype bfloat16] [--to hf] [--quantize RECIPE]

Parameter tree names (a public format, kept by Orbax checkpoints) are listed by
`param_shapes(cfg)`; the HF names they come from are in `checkpoints.keys`. Quantized
checkpoints (a recipe of model/quantization.py, or Meta's FP8 checkpoints) load as they are
stored: their quantized leaves are qwix QArrays, which model.forward / model.generate and
sharding/ take as they are.
Conversions carry the tokenizer and the other non-weight files (`checkpoints.assets`).

The names below are imported on first use, so that `python -m checkpoints.convert --help` answers
before JAX and Orbax are loaded.
"""
from __future__ import annotations

import importlib

from checkpoints.errors import CheckpointError

_LAZY = {"load": "loading", "save": "loading", "save_hf": "loading", "param_shapes": "keys",
         "hf_to_orbax": "conversion", "orbax_to_hf": "conversion"}
_SUBMODULES = ("assets", "conversion", "errors", "hf", "integrity", "keys", "loading",
               "orbax_io", "runs", "sources")

__all__ = ["CheckpointError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"checkpoints.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"checkpoints.{name}")
    raise AttributeError(f"module 'checkpoints' has no attribute {name!r}")
