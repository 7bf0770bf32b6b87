"""The integrity record of an Orbax directory (integrity.json): written when the directory is
complete, checked when it is read (unless the reader opts out), so that damage is an error
naming what is damaged instead of weights that load wrong in silence.

It holds what checkpoint.json said (the HF layout, the stored dtype), a SHA-256 of config.json,
and for every array its dtype, shape and a SHA-256 of its bytes in C order, as TensorStore reads
them back from disk. So it catches flipped bytes in data files, an edited dtype (in
checkpoint.json or in an array's own metadata), an edited config, and missing or extra arrays.
It is a record against damage, not a signature: whoever can rewrite the files can rewrite it.

Checking hashes every byte: the arrays a load has just read when this one process holds them
whole in the stored dtype, else (other processes, another dtype, a conversion) the stored bytes,
read once more. `experiments/bench_integrity.py` measures what it costs.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.keys import listing
from checkpoints.orbax_io import reason

FILE = "integrity.json"
SLAB_BYTES = 64 << 20  # read (and hashed) at a time


def _slabs(shape: tuple[int, ...], itemsize: int, slab_bytes: int):
    """Indices of consecutive C-order runs of at most ~slab_bytes covering an array of `shape`:
    whole trailing axes, rows of one axis, and every index of the axes before it."""
    if not shape:
        yield ()
        return
    axis = next(a for a in range(len(shape)) if math.prod(shape[a + 1:]) * itemsize <= slab_bytes)
    rows = max(1, slab_bytes // (math.prod(shape[axis + 1:]) * itemsize))
    for lead in np.ndindex(*shape[:axis]):
        for r in range(0, shape[axis], rows):
            yield (*lead, slice(r, min(r + rows, shape[axis])))  # TensorStore refuses overhang


def _update(h, a: np.ndarray):
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # no bfloat16 in buffers


def digest_array(a) -> str:
    """SHA-256 of an array's values in C order (a jax.Array is copied to the host if it is not
    there already)."""
    h = hashlib.sha256()
    _update(h, np.asarray(a))
    return h.hexdigest()


def digest(store, slab_bytes: int = SLAB_BYTES) -> str:
    """SHA-256 of an opened TensorStore's values, in C order; the next slab is read while this
    one is hashed."""
    h = hashlib.sha256()
    slabs = list(_slabs(tuple(store.shape), np.dtype(store.dtype.numpy_dtype).itemsize, slab_bytes))
    pending = store[slabs[0]].read() if slabs else None
    for i in range(len(slabs)):
        ahead = store[slabs[i + 1]].read() if i + 1 < len(slabs) else None
        _update(h, pending.result())
        pending = ahead
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _arrays(directory: Path, stores, arrays: dict | None = None) -> dict[str, dict]:
    """name -> dtype, shape (as stored) and digest, from `arrays` where given, else the stores."""
    arrays = arrays or {}

    def one(item):
        p, t = item
        name = "/".join(p)
        try:
            sha = digest_array(arrays[p]) if p in arrays else digest(t)
        except ValueError as e:  # what TensorStore raises for missing or damaged chunks
            raise CheckpointError(f"{directory}: cannot read {name} ({reason(e)})") from None
        return name, {"dtype": np.dtype(t.dtype.numpy_dtype).name, "shape": list(t.shape),
                      "sha256": sha}
    return dict(map(one, sorted(stores.items())))


def write(directory: Path, meta: dict, stores):
    """Record `directory` (complete: config.json, checkpoint.json with `meta`, and the arrays
    `stores` opened from it) in its integrity.json."""
    record = {"checkpoint.json": meta,
              "config.json sha256": _sha256_file(directory / "config.json"),
              "arrays": _arrays(directory, stores)}
    (directory / FILE).write_text(json.dumps(record, indent=1) + "\n")


def verify(directory: Path, meta: dict, stores, arrays: dict | None = None):
    """Hold `directory` against its record; one CheckpointError naming every difference.
    `arrays` {path: array}: values just read from `stores` in their stored dtype, hashed instead
    of reading those stores again."""
    path = directory / FILE
    skip = "pass verify=False (--no-verify) to load it unchecked"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {FILE}, so its integrity cannot be checked "
                              f"(written before integrity records, or the file was removed); {skip}")
    try:
        record = json.loads(path.read_text())
        recorded_meta, config_sha = record["checkpoint.json"], record["config.json sha256"]
        written = record["arrays"]
        if not isinstance(recorded_meta, dict) or not isinstance(written, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is damaged (not the record this package writes); "
                              f"{skip}") from None
    problems = [f"checkpoint.json field {k!r} is {meta.get(k)!r}, written as {recorded_meta.get(k)!r}"
                for k in sorted(set(meta) | set(recorded_meta)) if meta.get(k) != recorded_meta.get(k)]
    if _sha256_file(directory / "config.json") != config_sha:
        problems.append("config.json differs from the one written with the weights")
    found = _arrays(directory, stores, arrays)
    missing = sorted(set(written) - set(found))
    extra = sorted(set(found) - set(written))
    damaged = [f"{name} ({_difference(written[name], got)})" for name, got in found.items()
               if name in written and written[name] != got]
    for what, names in (("missing", missing), ("unrecorded", extra), ("damaged", damaged)):
        if names:
            problems.append(f"{len(names)} {what} array(s): {listing(names)}")
    if problems:
        raise CheckpointError(f"{directory} does not match its integrity record ({FILE}): "
                              + "; ".join(problems) + f". Re-convert it, or {skip}")


def _difference(want: dict, got: dict) -> str:
    if want.get("dtype") != got["dtype"]:
        return f"stored as {got['dtype']}, written as {want.get('dtype')}"
    if want.get("shape") != got["shape"]:
        return f"shape {got['shape']}, written as {want.get('shape')}"
    return "its bytes differ from those written"
