"""Checks of config values, types before ranges: one ConfigError naming the field, where a wrong
value would otherwise surface as a TypeError, a ZeroDivisionError or a misleading shape error deep
inside the model.

The dataclasses in config.py check their own fields (so presets and `--set` overrides are held to
the same rules); `from_hf` reads what it computes with through the `read_*` functions here, which
name the config.json field and file.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


class ConfigError(ValueError):
    """A config.json (or a preset override) that we cannot honour; the message names the field."""


# config.json names of the fields we name otherwise: messages give both.
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "num_experts": "num_local_experts",
            "experts_per_token": "num_experts_per_tok", "nope_layers": "no_rope_layers",
            "eos_token_ids": "eos_token_id", "image_token_id": "image_token_index",
            "boi_token_id": "boi_token_index", "eoi_token_id": "eoi_token_index",
            "vision_config.num_layers": "vision_config.num_hidden_layers",
            "vision_config.num_heads": "vision_config.num_attention_heads"}


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check(ok: bool, name: str, why: str):
    if not ok:
        hf = HF_NAMES.get(name)
        raise ConfigError(f"config field {hf!r} ({name}): {why}" if hf
                          else f"config field {name!r}: {why}")


def check_ints(obj, names: tuple[str, ...], minimum: int = 1, prefix: str = ""):
    for n in names:
        v = getattr(obj, n)
        check(is_int(v) and v >= minimum, prefix + n, f"must be an integer >= {minimum}, got {v!r}")


def check_numbers(obj, names: tuple[str, ...], positive: bool = True, prefix: str = ""):
    """Finite numbers, > 0 (`positive`) or >= 0."""
    for n in names:
        v = getattr(obj, n)
        ok = is_real(v) and math.isfinite(v) and (v > 0 if positive else v >= 0)
        check(ok, prefix + n, f"must be a finite number {'>' if positive else '>='} 0, got {v!r}")


def check_bools(obj, names: tuple[str, ...]):
    for n in names:
        v = getattr(obj, n)
        check(isinstance(v, bool), n, f"must be true or false, got {v!r}")


def check_int_tuple(obj, name: str, minimum: int = 0, optional: bool = False):
    """A tuple of integers >= minimum (None too when `optional`)."""
    v = getattr(obj, name)
    ok = isinstance(v, tuple) and all(is_int(i) and i >= minimum for i in v)
    check(ok or (optional and v is None), name,
          f"must be a list of integers >= {minimum}, got {v!r}")


# ---- reading config.json: the value of `name` in the dict `d`, or `default` when absent ----

def _bad(where: str, name: str, what: str, v) -> ConfigError:
    return ConfigError(f"{where}: field {name!r} must be {what}, got {v!r}")


def read_int(d: dict, name: str, default, where: str, minimum: int = 1) -> int:
    v = d.get(name, default)
    if not is_int(v) or v < minimum:
        raise _bad(where, name, f"an integer >= {minimum}", v)
    return v


def read_number(d: dict, name: str, default, where: str) -> float:
    """A finite number (ranges are the dataclass's to check), as a float."""
    v = d.get(name, default)
    if not is_real(v) or not math.isfinite(v):
        raise _bad(where, name, "a finite number", v)
    return float(v)


def read_object(d: dict, name: str, where: str) -> dict:
    """A JSON object, {} when absent or null."""
    v = d.get(name)
    if v is not None and not isinstance(v, dict):
        raise _bad(where, name, "an object", v)
    return v or {}


def read_list(d: dict, name: str, where: str) -> list | None:
    v = d.get(name)
    if v is not None and not isinstance(v, list):
        raise _bad(where, name, "a list", v)
    return v
