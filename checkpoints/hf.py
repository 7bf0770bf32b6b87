"""HF checkpoint directories: config.json plus model.safetensors or shards with an index.

Reading never loads a file: headers give every tensor's dtype and shape, and each slab of rows is
read through a memory map opened for that read alone, so a converter's resident memory is one
slab, not the mapped files. float8 tensors (Meta's FP8 checkpoints, checkpoints/fp8.py), which
safetensors' numpy reader cannot name, are mapped at the offsets their header gives. Writing is our own few lines of the safetensors format (an 8-byte
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

from checkpoints import fp8
from checkpoints import keys as K
from checkpoints.errors import CheckpointError
from model.config import Config, ConfigError, from_hf, to_hf

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = ("F32", "F16", "BF16")  # what every tensor but an fp8 checkpoint's quantized weights is
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
    return read_quantized_config(path)[0]


def read_quantized_config(path: Path) -> tuple[Config, dict | None]:
    """(config, its quantization_config: Meta's FP8 layout, or None)."""
    d, quantization = fp8.split_config(read_json(path), str(path))
    try:
        return from_hf(d, where=str(path)), quantization
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
        self.cfg, quantization = read_quantized_config(self.path / "config.json")
        # name -> (file, dtype name, shape)
        self.tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self._offsets: dict[str, int] = {}  # where the data of each float8 tensor starts
        files = self._files()
        for file in sorted(set(files.values())):
            self._read_header(file)
        for name, file in files.items():
            if name is not None and self.tensors.get(name, (None,))[0] != file:
                raise CheckpointError(f"{self.path / INDEX} lists {name} in {file.name}, "
                                      "which does not hold it")
        self.layout = K.detect_layout(self.tensors)
        # Meta's FP8 layout: the MoE layers whose experts are fp8 on disk; None: unquantized
        self.fp8_layers = fp8.fp8_layers(self.tensors) if quantization is not None else None
        if quantization is None and fp8.has_scales(self.tensors):
            raise CheckpointError(f"{self.path}: tensors have weight_scales but config.json has "
                                  "no quantization_config")
        if quantization is not None and not self.fp8_layers:
            raise CheckpointError(f"{self.path}: config.json has a quantization_config but no "
                                  "routed expert is stored in fp8 with a weight_scale")

    @property
    def fp8(self) -> bool:
        return self.fp8_layers is not None

    def keys(self) -> list[K.Key]:
        """The HF tensors this checkpoint's config and layout imply (K.hf_keys)."""
        return K.hf_keys(self.cfg, self.layout, self.fp8_layers)

    def unquantized_moe_layers(self) -> list[int]:
        """The MoE layers of an fp8 checkpoint whose experts are stored in bf16 (quantized to
        fp8 as they load: checkpoints/fp8.py)."""
        return [i for i, s in enumerate(self.cfg.text.layer_specs)
                if self.fp8 and s.moe and i not in self.fp8_layers]

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
        if any(d == fp8.FP8_DTYPE for f, d, _ in self.tensors.values() if f == file):
            with open(file, "rb") as f:  # the header, already validated by safetensors above
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            self._offsets |= {name: 8 + n + h["data_offsets"][0] for name, h in header.items()
                              if name != "__metadata__" and h["dtype"] == fp8.FP8_DTYPE}

    def check(self, hf_keys: list[K.Key]):
        """Every tensor that is missing, unexpected, misshapen or not a float, at once (fp8 for
        the quantized weights of an fp8 checkpoint, F32, F16 or BF16 for the rest)."""
        qvalues = {k.hf for k in hf_keys if k.ours[0][-1] == "qvalue"}
        odd = sorted(f"{n} ({d})" for n, (_, d, _) in self.tensors.items()
                     if ((d != fp8.FP8_DTYPE) if n in qvalues else (d not in FLOATS)))
        K.check({k.hf: k.hf_shape for k in hf_keys},
                {n: s for n, (_, _, s) in self.tensors.items()}, str(self.path),
                also=(("of a dtype other than F32, F16, BF16 (F8_E4M3 for fp8 weights)", odd),))

    def dtype(self) -> np.dtype:
        """The one dtype the unquantized tensors are stored in (published checkpoints: bf16)."""
        found = {d for n, (_, d, _) in self.tensors.items()
                 if d != fp8.FP8_DTYPE and not n.endswith(fp8.SCALE_SUFFIX)}
        if len(found) != 1:
            raise CheckpointError(f"{self.path} mixes dtypes {sorted(found)}; pass a dtype to "
                                  "convert them to")
        return DTYPES[found.pop()]

    def read(self, name: str, rows: slice) -> np.ndarray:
        """Rows of one tensor. The file is mapped for this read only: its pages leave our
        resident set as soon as the slab has been copied out."""
        file, dtype, shape = self.tensors[name]
        if name in self._offsets:
            data = np.memmap(file, DTYPES[dtype], "r", self._offsets[name], shape)
            return np.array(data[rows])
        with safe_open(file, framework="numpy") as f:
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
