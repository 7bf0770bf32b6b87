"""`load`, `save` and `save_hf`: checkpoints to and from parameters in memory (see __init__)."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from checkpoints import hf, integrity, orbax_io, runs, sources
from checkpoints import keys as K
from checkpoints.conversion import (SLAB_BYTES, NonFinite, open_orbax, stored_slabs,
                                    warn_unquantized, write_orbax)
from checkpoints.errors import CheckpointError, staged_dir
from checkpoints.keys import param_shapes
from model import quantization
from model.config import Config


def load(path, dtype=None, shardings=None, verify: bool = True) -> tuple[Config, dict]:
    """(config, params) from an HF directory, an Orbax directory written by this package, or a
    training run directory of experiments.train (its latest step) or one step of it.

    Leaves are jax.Arrays in the stored dtype unless `dtype` is given; cfg.param_dtype says which.
    A quantized checkpoint's quantized leaves are QArrays (their qvalues and float32 scales as
    stored, whatever `dtype`): model.quantization.dequantize_params undoes them.
    `shardings` (one Sharding, a tree of them shaped like params, or a function of the config
    returning either, e.g. `lambda cfg: sharding.param_shardings(cfg, mesh)`) places each leaf
    as it is read (a quantized leaf's scale split as its weight, but not on the axes it reduces);
    from Orbax or a run each host then reads only its own shards, while an HF
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
        params = runs.restore_params(step, cfg, dtype, _placement(shardings, cfg, None))
    elif what == "orbax":
        cfg, _, stored, stores, meta = open_orbax(path, verify=False)  # checked once read, below
        recipe = meta.get("quantization")
        dtype = np.dtype(dtype) if dtype is not None else stored
        arrays = K.stored(cfg, recipe)
        flat = traverse_util.flatten_dict(orbax_io.restore(
            path / orbax_io.PARAMS, {p: s.shape for p, s in arrays.items()},
            _dtypes(arrays, dtype), _placement(shardings, cfg, recipe), where=path))
        if verify:  # hashing what was just read, where this process holds it in the stored dtype
            read = flat if dtype == stored and jax.process_count() == 1 else None
            integrity.verify(path, meta, stores, read)
        params = K.tree(flat)
    else:
        ckpt = hf.HFCheckpoint(path)
        recipe = "fp8_mixed" if ckpt.fp8 else None
        cfg, hf_keys = ckpt.cfg, ckpt.keys()
        ckpt.check(hf_keys)
        warn_unquantized(ckpt)
        dtype = np.dtype(dtype) if dtype is not None else ckpt.dtype()
        arrays = K.stored(cfg, recipe)
        dtypes = _dtypes(arrays, dtype)
        flat = {p: np.empty(s.shape, dtypes[p]) for p, s in arrays.items()}
        read = NonFinite(ckpt.read)
        for p, idx, slab in K.ours_slabs(hf_keys, read, SLAB_BYTES):
            for stored_path, y in stored_slabs(p, slab, recipe):
                flat[stored_path][idx] = y
        read.warn(path)
        place = _placement(shardings, cfg, recipe)
        # pop: each host copy is freed as soon as its leaf is on the device
        params = K.tree({p: jax.device_put(flat.pop(p), place[p]) for p in list(flat)})
    return cfg.replace(param_dtype=dtype.name), params


def _dtypes(arrays: dict, dtype: np.dtype) -> dict:
    """The dtype each stored array is read into: `dtype`, but a quantized leaf's qvalue and
    scale as stored."""
    parts = K.quantized_parts(arrays)
    return {p: np.dtype(s.dtype) if p in parts else dtype for p, s in arrays.items()}


def _placement(shardings, cfg: Config, recipe: str | None) -> dict:
    """Flat {stored array: Sharding}; the first device when none is asked for. A quantized
    leaf's qvalue and scale take its weight's sharding, the scale none on the axes it reduces
    to size 1 (model.quantization.child_axes)."""
    if callable(shardings):
        shardings = shardings(cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = K.stored(cfg, recipe)
    if isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in arrays}
    given, shapes = K.flat_arrays(shardings), K.param_shapes(cfg)
    return {p: given[p] if p in given else _child_sharding(given[p[:-1]], shapes[p[:-1]], s.shape)
            for p, s in arrays.items()}


def _child_sharding(sharding, full: tuple[int, ...], child: tuple[int, ...]):
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = quantization.child_axes(sharding.spec, full, child)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _check_params(cfg: Config, params) -> tuple[np.dtype, str | None]:
    """(the one dtype of the unquantized leaves of `params`, their recipe), after checking
    their arrays against the config."""
    try:
        recipe = quantization.recipe_of(cfg, params)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    flat = K.flat_arrays(params)
    K.check({"/".join(p): s for p, s in param_shapes(cfg, recipe).items()},
            {"/".join(p): tuple(x.shape) for p, x in flat.items()}, "params")
    parts = K.quantized_parts(flat)
    dtypes = {np.dtype(x.dtype) for p, x in flat.items() if p not in parts}
    if len(dtypes) != 1:
        raise CheckpointError(f"params mix dtypes {sorted(d.name for d in dtypes)}; "
                              "cast them to one first")
    return dtypes.pop(), recipe


def save(path, cfg: Config, params, layout: str | None = None):
    """Write in-memory `params` as a new Orbax directory; `layout` is the HF layout to convert
    back to (default: the one HF uses for this kind of model). Quantized params (by a recipe of
    model/quantization.py) are written with their recipe."""
    dtype, recipe = _check_params(cfg, params)
    stored = traverse_util.unflatten_dict(K.flat_arrays(params))
    write_orbax(Path(path), cfg, layout or K.default_layout(cfg), dtype,
                lambda directory: orbax_io.save(directory, stored), recipe)


def save_hf(path, cfg: Config, params, layout: str | None = None, *,
            max_shard_bytes: int = hf.MAX_SHARD_BYTES):
    """Write in-memory `params` (unquantized) as a new HF directory (config.json + safetensors)."""
    dtype, recipe = _check_params(cfg, params)
    if recipe is not None:
        raise CheckpointError(f"params are quantized ({recipe}); an HF directory is written from "
                              "unquantized params (model.quantization.dequantize_params)")
    flat = {p: np.asarray(x) for p, x in traverse_util.flatten_dict(params).items()}
    with staged_dir(path) as tmp:
        hf.write(tmp, cfg, layout or K.default_layout(cfg), lambda p, idx: flat[p][idx], dtype,
                 slab_bytes=SLAB_BYTES, max_shard_bytes=max_shard_bytes)
