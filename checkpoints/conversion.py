"""Checkpoint conversion between HF safetensors and Orbax directories (and from training runs to
either), streaming.

Both directions move one slab (at most ~SLAB_BYTES of one tensor) at a time, so peak memory does
not grow with the checkpoint. Every check that can fail runs before the first byte is written,
and the output appears at its destination only when complete (errors.staged_dir). An Orbax
directory is checked against its integrity record before it is read (integrity.py), and NaN or
inf values in an HF checkpoint are named in a warning. The tokenizer and the other non-weight
files go along (assets.py).

Quantized checkpoints: `hf_to_orbax(..., quantize=RECIPE)` quantizes each slab as it passes
(model/quantization.py): a slab holds whole HF rows, which are our leaves' output channels, so
it holds whole input axes, over which scales and groups are taken. Meta's FP8 checkpoints
(checkpoints/fp8.py) convert as they are, into the fp8_mixed layout.
"""
from __future__ import annotations

import asyncio
import collections
import math
import warnings
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import numpy as np
from tqdm import tqdm

from checkpoints import assets, hf, integrity, orbax_io, runs, sources
from checkpoints import keys as K
from checkpoints.errors import CheckpointError, staged_dir
from model import quantization
from model.config import Config

SLAB_BYTES = 64 << 20    # sized for 4-byte elements; a slab is never less than one HF row
COMMIT_BYTES = 32 << 20  # written data allowed to wait for its commit


def leaf_specs(cfg: Config, hf_keys: list[K.Key], dtype, slab_bytes: int,
               recipe: str | None = None) -> dict[K.Path, orbax_io.LeafSpec]:
    """Each stored array's shape and dtype (a quantized leaf's qvalue and scale: their own),
    and its write shape: one slab of one HF tensor (of a scale: the slab's scales)."""
    write = {}
    for key in hf_keys:
        _, _, slab = next(key.slabs(slab_bytes))
        write |= {p: (1,) * len(key.index) + slab for p in key.ours}
    shapes, arrays = K.param_shapes(cfg), K.stored(cfg, recipe)
    parts = K.quantized_parts(arrays)
    specs = {}
    for p, s in arrays.items():
        if p not in write:  # quantized as it is written: the write shape of its weight's slab
            leaf = shapes[p[:-1]]
            write[p] = tuple(w if n == m else n for w, n, m in zip(write[p[:-1]], s.shape, leaf))
        specs[p] = orbax_io.LeafSpec(tuple(s.shape), np.dtype(s.dtype if p in parts else dtype),
                                     write[p])
    return specs


def stored_slabs(path: K.Path, y: np.ndarray, recipe: str | None):
    """(stored array, data) for one slab of our leaf `path`: itself, or quantized by `recipe`
    into its qvalue and scale."""
    s = quantization.scheme(recipe, path) if recipe else None
    if s is None:
        return [(path, y)]
    q = quantization.quantize(y, s)
    return [(path + ("qvalue",), np.asarray(q.qvalue)), (path + ("scale",), np.asarray(q.scale))]


def warn_unquantized(ckpt: hf.HFCheckpoint):
    """The warning for an fp8 checkpoint's MoE layers whose experts are bf16 on disk."""
    if layers := ckpt.unquantized_moe_layers():
        warnings.warn(f"{ckpt.path}: the routed experts of layers {layers} are bf16 (its "
                      "quantization_config ignores them); they are quantized to fp8 as they load, "
                      "as fp8_mixed quantizes every MoE layer (one dtype per stacked leaf)",
                      stacklevel=3)


def open_orbax(src: Path, verify: bool = True
               ) -> tuple[Config, str, np.dtype, orbax_io.Stores, dict]:
    """(config, HF layout, stored dtype, every array opened unread, checkpoint.json) of an
    Orbax directory, after holding its arrays against the config and its recipe (every mismatch
    at once) and, with `verify`, the whole directory against its integrity record (reading every
    byte)."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if not orbax_io.is_orbax_dir(src):
        raise CheckpointError(f"{src} is not an Orbax checkpoint written by checkpoints.convert "
                              f"(it needs {orbax_io.META} and {orbax_io.PARAMS}/)")
    cfg, layout, dtype, meta = orbax_io.read_meta(src)
    try:
        stores = orbax_io.open_lazy(src / orbax_io.PARAMS)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src / orbax_io.PARAMS} is not a readable Orbax checkpoint "
                              f"({orbax_io.reason(e)})") from None
    if verify:
        integrity.verify(src, meta, stores)
    K.check({"/".join(p): s for p, s in K.param_shapes(cfg, meta.get("quantization")).items()},
            {"/".join(p): tuple(t.shape) for p, t in stores.items()}, str(src))
    return cfg, layout, dtype, stores, meta


def open_ours(src: Path, verify: bool = True
              ) -> tuple[Config, str, np.dtype, orbax_io.Stores, Path]:
    """(config, HF layout, stored dtype, every parameter opened unread, directory of the
    non-weight files) of a source in our tree's form: an Orbax directory (checked against its
    integrity record with `verify`) or a training run or one of its steps (text decoder only,
    so the HF layout is Llama4ForCausalLM's)."""
    if sources.kind(src) == "run":
        step = runs.step_dir(src)
        cfg = runs.read_config(step)
        stores = runs.open_params(step, cfg)
        return (cfg, K.default_layout(cfg), np.dtype(cfg.param_dtype), stores,
                runs.run_dir(step))
    cfg, layout, dtype, stores, _ = open_orbax(src, verify)
    return cfg, layout, dtype, stores, src


def write_orbax(dst: Path, cfg: Config, layout: str, dtype, save: Callable[[Path], None],
                assets_from: Path | None = None, recipe: str | None = None):
    """A new Orbax directory `dst`: metadata, the parameters that `save(params_dir)` writes, the
    non-weight files of `assets_from`, then the integrity record of what is on disk; it appears
    at `dst` only when complete. `recipe`: the quantization recipe the parameters are in."""
    with staged_dir(dst) as tmp:
        meta = orbax_io.write_meta(tmp, cfg, layout, dtype, recipe)
        save(tmp / orbax_io.PARAMS)
        if assets_from is not None:
            assets.copy(assets_from, tmp)
        integrity.write(tmp, meta, orbax_io.open_lazy(tmp / orbax_io.PARAMS))


class NonFinite:
    """A reader of HF tensors (name, rows) -> slab that counts the NaN and inf values it passes,
    so that a conversion or load can say which tensors hold them."""

    def __init__(self, read: Callable[[str, slice], np.ndarray]):
        self.read, self.counts = read, collections.Counter()

    def __call__(self, name: str, rows: slice) -> np.ndarray:
        y = self.read(name, rows)
        self.counts[name] += y.size - np.count_nonzero(np.isfinite(y))
        return y

    def warn(self, where):
        bad = [f"{n} ({c})" for n, c in self.counts.items() if c]
        if bad:
            warnings.warn(f"{where}: {len(bad)} tensor(s) hold NaN or inf values (count in "
                          f"brackets): {K.listing(bad)}; the model will compute NaN", stacklevel=3)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)


def quantized_source(src: Path, quantize: str | None) -> str | None:
    """The recipe of converting `src` (quantized by `quantize`): the refusals of --quantize
    (an unknown recipe, a source quantized already) before anything is read or written."""
    if quantize is None:
        return None
    if quantize not in quantization.RECIPES:
        raise CheckpointError(f"unknown quantization recipe {quantize!r}; choose from "
                              f"{list(quantization.RECIPES)}")
    what = sources.kind(src)
    if what == "orbax":
        done = orbax_io.read_meta(src)[3].get("quantization")
        raise CheckpointError(
            f"{src} is quantized already ({done})" if done else
            f"{src} is an Orbax checkpoint; --quantize reads the HF checkpoint it came from")
    if what == "run":
        raise CheckpointError(f"{src} is a training run; --quantize reads an HF checkpoint "
                              "(convert the run --to hf first)")
    return quantize


def _filler(slabs: Iterator[tuple[K.Path, tuple, np.ndarray]], specs: dict, total: int,
            desc: str, progress: bool) -> Callable[[orbax_io.Stores], Awaitable[None]]:
    """The `fill` of orbax_io.save_streamed that writes these (stored array, index, data) slabs,
    each in its array's dtype (`specs`, from leaf_specs)."""
    async def fill(stores: orbax_io.Stores):
        # Each commit syncs to disk: waiting for each in turn made small tensors crawl, and
        # letting all of them pile up would hold the checkpoint in memory. So commits overlap
        # while the data they hold stays under COMMIT_BYTES.
        pending: collections.deque = collections.deque()
        held = 0
        try:
            with _bar(total, desc, progress) as bar:
                for path, idx, y in slabs:
                    bar.update(y.nbytes)
                    y = y.astype(specs[path].dtype, copy=False)
                    write = stores[path][idx].write(y)
                    await write.copy
                    pending.append((write.commit, y.nbytes))
                    held += y.nbytes
                    while held > COMMIT_BYTES:
                        commit, n = pending.popleft()
                        await commit
                        held -= n
        finally:  # even on failure: no write may land after the cleanup has removed the directory
            done = await asyncio.gather(*(c for c, _ in pending), return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result
    return fill


def hf_to_orbax(src, dst, dtype=None, *, quantize: str | None = None,
                slab_bytes: int = SLAB_BYTES, progress: bool = True):
    """HF directory `src` -> new Orbax directory `dst`, one slab in memory at a time, with the
    tokenizer and the other non-weight files; with `quantize` (a recipe of
    model/quantization.py) quantized as it is written. Meta's FP8 checkpoints convert as they
    are (fp8_mixed); quantizing them again is refused."""
    src, dst = Path(src), Path(dst)
    recipe = quantized_source(src, quantize)
    ckpt = hf.HFCheckpoint(src)
    if ckpt.fp8 and quantize:
        raise CheckpointError(f"{src} is quantized already (Meta's FP8 layout: its routed "
                              "experts are float8_e4m3fn); convert it without --quantize, as "
                              "fp8_mixed")
    recipe = "fp8_mixed" if ckpt.fp8 else recipe
    hf_keys = ckpt.keys()
    ckpt.check(hf_keys)
    warn_unquantized(ckpt)
    dtype = np.dtype(dtype) if dtype is not None else ckpt.dtype()
    specs = leaf_specs(ckpt.cfg, hf_keys, dtype, slab_bytes, recipe)
    total = sum(math.prod(k.hf_shape) * hf.DTYPES[ckpt.tensors[k.hf][1]].itemsize for k in hf_keys)
    read = NonFinite(ckpt.read)
    slabs = ((stored, idx, y) for path, idx, slab in K.ours_slabs(hf_keys, read, slab_bytes)
             for stored, y in stored_slabs(path, slab, recipe))
    fill = _filler(slabs, specs, total, f"{src.name} -> orbax", progress)
    write_orbax(dst, ckpt.cfg, ckpt.layout, dtype,
                lambda params: orbax_io.save_streamed(params, specs, fill), assets_from=src,
                recipe=recipe)
    read.warn(src)


def run_to_orbax(src, dst, dtype=None, *, slab_bytes: int = SLAB_BYTES, progress: bool = True):
    """A training run (its latest step) or one step -> new Orbax directory `dst`, one slab in
    memory at a time, with the run's tokenizer and other non-weight files."""
    src, dst = Path(src), Path(dst)
    cfg, layout, stored, stores, asset_dir = open_ours(src)
    dtype = np.dtype(dtype) if dtype is not None else stored
    hf_keys = K.hf_keys(cfg, layout)
    total = sum(math.prod(s) for s in K.param_shapes(cfg).values()) * stored.itemsize
    specs = leaf_specs(cfg, hf_keys, dtype, slab_bytes)
    fill = _filler(K.leaf_slabs(hf_keys, _reader(src, stores), slab_bytes), specs, total,
                   f"{src.name} -> orbax", progress)
    write_orbax(dst, cfg, layout, dtype, lambda params: orbax_io.save_streamed(
        params, specs, fill), assets_from=asset_dir)


def _reader(src: Path, stores: orbax_io.Stores) -> Callable[[K.Path, tuple], np.ndarray]:
    def read(path: K.Path, idx: tuple) -> np.ndarray:
        try:
            return stores[path][idx].read().result()
        except ValueError as e:  # what TensorStore raises for missing or damaged chunks
            raise CheckpointError(f"{src}: cannot read {'/'.join(path)} "
                                  f"({orbax_io.reason(e)})") from None
    return read


def orbax_to_hf(src, dst, dtype=None, *, slab_bytes: int = SLAB_BYTES,
                max_shard_bytes: int = hf.MAX_SHARD_BYTES, progress: bool = True,
                verify: bool = True):
    """Orbax directory (or training run, or one step of one) `src` -> new HF directory `dst`, in
    the key layout `src` came from, with the tokenizer and the other non-weight files.
    `verify`: check an Orbax `src` against its integrity record first."""
    src, dst = Path(src), Path(dst)
    if sources.kind(src) == "orbax" and (done := orbax_io.read_meta(src)[3].get("quantization")):
        raise CheckpointError(f"{src} is quantized ({done}), and only unquantized checkpoints "
                              "convert back to HF: load it, model.quantization.dequantize_params, "
                              "checkpoints.save_hf")
    cfg, layout, stored, stores, asset_dir = open_ours(src, verify)
    dtype = np.dtype(dtype) if dtype is not None else stored
    total = sum(math.prod(s) for s in K.param_shapes(cfg).values()) * dtype.itemsize
    with staged_dir(dst) as tmp, _bar(total, f"{src.name} -> hf", progress) as bar:
        hf.write(tmp, cfg, layout, _reader(src, stores), dtype, slab_bytes=slab_bytes,
                 max_shard_bytes=max_shard_bytes, progress=bar.update)
        assets.copy(asset_dir, tmp)


def convert(src, dst, to: str = "orbax", dtype=None, *, quantize: str | None = None,
            max_shard_bytes: int = hf.MAX_SHARD_BYTES, verify: bool = True, progress: bool = True):
    """`python -m checkpoints.convert`: an HF directory or a training run to Orbax (`to`
    "orbax"), an Orbax directory or a training run to HF ("hf"). The other two directions are
    one error saying which direction the source converts in. `quantize`: a recipe, HF to Orbax
    only (hf_to_orbax)."""
    src = Path(src)
    quantized_source(src, quantize)
    if quantize is not None and to == "hf":
        raise CheckpointError("--quantize writes an Orbax checkpoint; it does not go with --to hf")
    what = sources.kind(src)
    if to == "orbax" and what == "orbax":
        raise CheckpointError(f"{src} is an Orbax checkpoint already; to convert it to HF, pass "
                              "--to hf")
    if to == "hf" and what == "hf":
        raise CheckpointError(f"{src} is an HF checkpoint already; it converts to Orbax without "
                              "--to hf")
    if to == "hf":
        orbax_to_hf(src, dst, dtype, max_shard_bytes=max_shard_bytes, progress=progress,
                    verify=verify)
    else:
        if what == "hf":
            hf_to_orbax(src, dst, dtype, quantize=quantize, progress=progress)
        else:
            run_to_orbax(src, dst, dtype, progress=progress)
