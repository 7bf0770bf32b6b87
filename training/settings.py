"""Checks of training settings (OptimConfig and RunConfig fields, which the command line sets
flag for flag): values that would train uphill, train nothing, or lose the run are refused
before anything is read or written."""
from __future__ import annotations

import math

from model.config_checks import is_int, is_real


class SettingsError(ValueError):
    """A training setting that makes no sense; the message names it and its command-line flag."""


def _name(field: str) -> str:
    return f"{field} (--{field.replace('_', '-')})"


def require_int(obj, field: str, minimum: int, optional: bool = False):
    v = getattr(obj, field)
    if not (optional and v is None) and (not is_int(v) or v < minimum):
        raise SettingsError(f"{_name(field)} must be an integer >= {minimum}, got {v!r}")


def require_number(obj, field: str, low: float, high: float = math.inf, open_low: bool = False,
                   open_high: bool = False):
    """A finite number in [low, high], each end open when asked."""
    v = getattr(obj, field)
    ok = is_real(v) and math.isfinite(v) and (v > low if open_low else v >= low) \
        and (v < high if open_high else v <= high)
    if not ok:
        span = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise SettingsError(f"{_name(field)} must be a finite number in {span}, got {v!r}")
