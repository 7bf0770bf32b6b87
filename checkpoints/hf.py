"""HF checkpoint directories: config.json plus model.safetensors or shards with an index.

Reading never loads a file: headers give every tensor's dtype and shape, and each slab of rows is
read through a memory map opened for that read alone, so a converter's resident memory is one
slab, not the mapped files. Writing is our own few lines of the safetensors format (an 8-byte
header length, a JSON header, raw little-endian data) so that a tensor streams to disk slab by slab
instead of a whole shard being built in memory first.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from checkpoints import keys as K
from checkpoints.errors import CheckpointError
from model.config import Config, ConfigError, from_hf, to_hf

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # what HF's save_pretrained used for years


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE).is_file()
                                                 or (path / INDEX).is_file())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def read_config(path: Path) -> Config:
    try:
        return from_hf(read_json(path), where=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


class HFCheckpoint:
    """An HF directory opened for reading; only headers have been read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path} does not exist")
        if not is_hf_dir(self.path):
            raise CheckpointError(f"{self.path} is not an HF checkpoint directory (it needs "
                                  f"config.json and {SINGLE} or {INDEX})")
        self.cfg = read_config(self.path / "config.json")
        # name -> (file, dtype name, shape)
        self.tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        files = self._files()
        for file in sorted(set(files.values())):
            self._read_header(file)
        for name, file in files.items():
            if name is not None and self.tensors.get(name, (None,))[0] != file:
                raise CheckpointError(f"{self.path / INDEX} lists {name} in {file.name}, "
                                      "which does not hold it")
        self.layout = K.detect_layout(self.tensors)

    def _files(self) -> dict[str | None, Path]:
        """Tensor name -> file, from the index; {None: model.safetensors} without one."""
        if not (self.path / INDEX).is_file():
            return {None: self.path / SINGLE}
        index = read_json(self.path / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{self.path / INDEX} has no 'weight_map' object")
        files = {name: self.path / file for name, file in weight_map.items()}
        absent = sorted({f.name for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{self.path / INDEX} names shard(s) that do not exist: "
                                  + ", ".join(absent))
        return files

    def _read_header(self, file: Path):
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name in self.tensors:
                        raise CheckpointError(f"tensor {name} is in both "
                                              f"{self.tensors[name][0].name} and {file.name}")
                    sl = f.get_slice(name)
                    self.tensors[name] = (file, sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file "
                                  f"({str(e).splitlines()[0]})") from None

    def check(self, hf_keys: list[K.Key]):
        """Every tensor that is missing, unexpected, misshapen or not a float, at once."""
        odd = sorted(f"{n} ({d})" for n, (_, d, _) in self.tensors.items() if d not in DTYPES)
        K.check({k.hf: k.hf_shape for k in hf_keys},
                {n: s for n, (_, _, s) in self.tensors.items()}, str(self.path),
                also=(("of a dtype other than F32, F16, BF16", odd),))

    def dtype(self) -> np.dtype:
        """The one dtype the tensors are stored in (published checkpoints are all bf16)."""
        found = {d for _, d, _ in self.tensors.values()}
        if len(found) != 1:
            raise CheckpointError(f"{self.path} mixes dtypes {sorted(found)}; pass a dtype to "
                                  "convert them to")
        return DTYPES[found.pop()]

    def read(self, name: str, rows: slice) -> np.ndarray:
        """Rows of one tensor. The file is mapped for this read only: its pages leave our
        resident set as soon as the slab has been copied out."""
        with safe_open(self.tensors[name][0], framework="numpy") as f:
            return f.get_slice(name)[rows]


def write(dst: Path, cfg: Config, layout: str, read_ours: Callable[[K.Path, tuple], np.ndarray],
          dtype: np.dtype, *, slab_bytes: int, max_shard_bytes: int = MAX_SHARD_BYTES,
          progress: Callable[[int], None] = lambda n: None):
    """Write an HF directory into the existing, empty `dst`, one slab at a time."""
    hf_keys = K.hf_keys(cfg, layout)
    dtype = np.dtype(dtype)
    shards: list[list[K.Key]] = [[]]
    size = 0
    for key in hf_keys:  # HF's rule: a new shard when the next tensor would overflow this one
        n = math.prod(key.hf_shape) * dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        _write_file(dst / name, shard, read_ours, dtype, slab_bytes, progress)
    if len(shards) > 1:
        total = sum(math.prod(k.hf_shape) for k in hf_keys) * dtype.itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {k.hf: name for name, shard in zip(names, shards) for k in shard}}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(
        json.dumps({**to_hf(cfg), "dtype": dtype.name}, indent=2) + "\n")


def _write_file(file: Path, hf_keys: list[K.Key], read_ours, dtype: np.dtype, slab_bytes: int,
                progress):
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for key in hf_keys:
        n = math.prod(key.hf_shape) * dtype.itemsize
        header[key.hf] = {"dtype": DTYPE_NAMES[dtype], "shape": list(key.hf_shape),
                          "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in hf_keys:
            for slab in K.hf_slabs(key, read_ours, slab_bytes):
                data = np.ascontiguousarray(slab, dtype=dtype)  # native order: little-endian hosts
                f.write(data.view(np.uint8).data)
                progress(data.nbytes)
        if f.tell() != 8 + len(raw) + offset:
            raise AssertionError(f"{file}: wrote {f.tell()} bytes, header promises more")
