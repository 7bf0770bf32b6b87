"""Checkpoint conversion between HF safetensors and Orbax directories, streaming.

Both directions move one slab (at most ~SLAB_BYTES of one tensor) at a time, so peak memory does
not grow with the checkpoint. Every check that can fail runs before the first byte is written,
and the output appears at its destination only when complete.
"""
from __future__ import annotations

import asyncio
import collections
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints import hf, orbax_io
from checkpoints import keys as K
from checkpoints.errors import CheckpointError, staged_dir
from model.config import Config

SLAB_BYTES = 64 << 20    # sized for 4-byte elements; a slab is never less than one HF row
COMMIT_BYTES = 32 << 20  # written data allowed to wait for its commit


def leaf_specs(cfg: Config, hf_keys: list[K.Key], dtype, slab_bytes: int
               ) -> dict[K.Path, orbax_io.LeafSpec]:
    """Each leaf's shape and dtype, and its write shape: one slab of one HF tensor."""
    write = {}
    for key in hf_keys:
        _, _, slab = next(key.slabs(slab_bytes))
        write |= {p: (1,) * len(key.index) + slab for p in key.ours}
    return {p: orbax_io.LeafSpec(s, np.dtype(dtype), write[p])
            for p, s in K.param_shapes(cfg).items()}


def open_orbax(src: Path) -> tuple[Config, str, np.dtype, orbax_io.Stores]:
    """(config, HF layout, stored dtype, every leaf opened unread) of an Orbax directory, after
    holding its leaves against the config (every mismatch at once)."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if not orbax_io.is_orbax_dir(src):
        raise CheckpointError(f"{src} is not an Orbax checkpoint written by checkpoints.convert "
                              f"(it needs {orbax_io.META} and {orbax_io.PARAMS}/)")
    cfg, layout, dtype = orbax_io.read_meta(src)
    try:
        stores = orbax_io.open_lazy(src / orbax_io.PARAMS)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src / orbax_io.PARAMS} is not a readable Orbax checkpoint "
                              f"({orbax_io.reason(e)})") from None
    K.check({"/".join(p): s for p, s in K.param_shapes(cfg).items()},
            {"/".join(p): tuple(t.shape) for p, t in stores.items()}, str(src))
    return cfg, layout, dtype, stores


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)


def hf_to_orbax(src, dst, dtype=None, *, slab_bytes: int = SLAB_BYTES, progress: bool = True):
    """HF directory `src` -> new Orbax directory `dst`, one slab in memory at a time."""
    src, dst = Path(src), Path(dst)
    ckpt = hf.HFCheckpoint(src)
    hf_keys = K.hf_keys(ckpt.cfg, ckpt.layout)
    ckpt.check(hf_keys)
    dtype = np.dtype(dtype) if dtype is not None else ckpt.dtype()
    total = sum(math.prod(k.hf_shape) * hf.DTYPES[ckpt.tensors[k.hf][1]].itemsize for k in hf_keys)

    async def fill(stores: orbax_io.Stores):
        # Each commit syncs to disk: waiting for each in turn made small tensors crawl, and
        # letting all of them pile up would hold the checkpoint in memory. So commits overlap
        # while the data they hold stays under COMMIT_BYTES.
        pending: collections.deque = collections.deque()
        held = 0
        try:
            with _bar(total, f"{src.name} -> orbax", progress) as bar:
                for path, idx, y in K.ours_slabs(hf_keys, ckpt.read, slab_bytes):
                    bar.update(y.nbytes)
                    y = y.astype(dtype, copy=False)
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

    with staged_dir(dst) as tmp:
        orbax_io.write_meta(tmp, ckpt.cfg, ckpt.layout, dtype)
        orbax_io.save_streamed(tmp / orbax_io.PARAMS,
                               leaf_specs(ckpt.cfg, hf_keys, dtype, slab_bytes), fill)


def orbax_to_hf(src, dst, dtype=None, *, slab_bytes: int = SLAB_BYTES,
                max_shard_bytes: int = hf.MAX_SHARD_BYTES, progress: bool = True):
    """Orbax directory `src` -> new HF directory `dst`, in the key layout `src` came from."""
    src, dst = Path(src), Path(dst)
    cfg, layout, stored, stores = open_orbax(src)
    dtype = np.dtype(dtype) if dtype is not None else stored
    total = sum(math.prod(s) for s in K.param_shapes(cfg).values()) * dtype.itemsize

    def read(path: K.Path, idx: tuple) -> np.ndarray:
        try:
            return stores[path][idx].read().result()
        except ValueError as e:  # what TensorStore raises for missing or damaged chunks
            raise CheckpointError(f"{src}: cannot read {'/'.join(path)} "
                                  f"({orbax_io.reason(e)})") from None

    with staged_dir(dst) as tmp, _bar(total, f"{src.name} -> hf", progress) as bar:
        hf.write(tmp, cfg, layout, read, dtype, slab_bytes=slab_bytes,
                 max_shard_bytes=max_shard_bytes, progress=bar.update)
