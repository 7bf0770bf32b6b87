"""`load`, `save` and `save_hf`: checkpoints to and from parameters in memory (see __init__)."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from checkpoints import hf, integrity, orbax_io, runs, sources
from checkpoints import keys as K
from checkpoints.conversion import SLAB_BYTES, NonFinite, open_orbax, write_orbax
from checkpoints.errors import CheckpointError, staged_dir
from checkpoints.keys import param_shapes
from model.config import Config


def load(path, dtype=None, shardings=None, verify: bool = True) -> tuple[Config, dict]:
    """(config, params) from an HF directory, an Orbax directory written by this package, or a
    training run directory of experiments.train (its latest step) or one step of it.

    Leaves are jax.Arrays in the stored dtype unless `dtype` is given; cfg.param_dtype says which.
    `shardings` (one Sharding, a tree of them shaped like params, or a function of the config
    returning either, e.g. `lambda cfg: sharding.param_shardings(cfg, mesh)`) places each leaf
    as it is read; from Orbax or a run each host then reads only its own shards, while an HF
    directory is first read whole into host memory.
    An Orbax directory is held against its integrity record (integrity.json): every array read
    is hashed (in one process, in the stored dtype: the values just read; otherwise the stored
    bytes, read again, all of them on each host). `verify=False` skips that, for speed, on a
    checkpoint you trust; a run has no record. HF tensors holding NaN or inf are named in a
    warning.
    """
    path = Path(path)
    what = sources.kind(path)
    if what == "run":
        step = runs.step_dir(path)
        cfg = runs.read_config(step)
        runs.open_params(step, cfg)  # every mismatch with the config at once, before reading
        dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
        shapes = param_shapes(cfg)
        params = runs.restore_params(step, cfg, dtype, _placement(shardings, shapes, cfg))
    elif what == "orbax":
        cfg, _, stored, stores, meta = open_orbax(path, verify=False)  # checked once read, below
        dtype = np.dtype(dtype) if dtype is not None else stored
        shapes = param_shapes(cfg)
        params = orbax_io.restore(path / orbax_io.PARAMS, shapes, dtype,
                                  _placement(shardings, shapes, cfg), where=path)
        if verify:  # hashing what was just read, where this process holds it in the stored dtype
            read = traverse_util.flatten_dict(params) if (
                dtype == stored and jax.process_count() == 1) else None
            integrity.verify(path, meta, stores, read)
    else:
        ckpt = hf.HFCheckpoint(path)
        cfg, hf_keys = ckpt.cfg, K.hf_keys(ckpt.cfg, ckpt.layout)
        ckpt.check(hf_keys)
        dtype = np.dtype(dtype) if dtype is not None else ckpt.dtype()
        flat = {p: np.empty(s, dtype) for p, s in param_shapes(cfg).items()}
        read = NonFinite(ckpt.read)
        for p, idx, y in K.ours_slabs(hf_keys, read, SLAB_BYTES):
            flat[p][idx] = y
        read.warn(path)
        place = _placement(shardings, flat, cfg)
        # pop: each host copy is freed as soon as its leaf is on the device
        params = {p: jax.device_put(flat.pop(p), place[p]) for p in list(flat)}
        params = traverse_util.unflatten_dict(params)
    return cfg.replace(param_dtype=dtype.name), params


def _placement(shardings, flat: dict, cfg: Config) -> dict:
    """Flat {leaf path: Sharding}; the first device when none is asked for."""
    if callable(shardings):
        shardings = shardings(cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in flat}
    return traverse_util.flatten_dict(shardings)


def _check_params(cfg: Config, params) -> np.dtype:
    """The one dtype of `params`, after checking its leaves against the config."""
    flat = traverse_util.flatten_dict(params)
    K.check({"/".join(p): s for p, s in param_shapes(cfg).items()},
            {"/".join(p): tuple(x.shape) for p, x in flat.items()}, "params")
    dtypes = {np.dtype(x.dtype) for x in flat.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"params mix dtypes {sorted(d.name for d in dtypes)}; "
                              "cast them to one first")
    return dtypes.pop()


def save(path, cfg: Config, params, layout: str | None = None):
    """Write in-memory `params` as a new Orbax directory; `layout` is the HF layout to convert
    back to (default: the one HF uses for this kind of model)."""
    dtype = _check_params(cfg, params)
    write_orbax(Path(path), cfg, layout or K.default_layout(cfg), dtype,
                lambda directory: orbax_io.save(directory, params))


def save_hf(path, cfg: Config, params, layout: str | None = None, *,
            max_shard_bytes: int = hf.MAX_SHARD_BYTES):
    """Write in-memory `params` as a new HF directory (config.json + safetensors)."""
    dtype = _check_params(cfg, params)
    flat = {p: np.asarray(x) for p, x in traverse_util.flatten_dict(params).items()}
    with staged_dir(path) as tmp:
        hf.write(tmp, cfg, layout or K.default_layout(cfg), lambda p, idx: flat[p][idx], dtype,
                 slab_bytes=SLAB_BYTES, max_shard_bytes=max_shard_bytes)
