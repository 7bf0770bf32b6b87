"""Our Orbax directories: the parameter tree (Orbax), config.json (HF form), checkpoint.json and
integrity.json (see integrity.py).

checkpoint.json records the HF key layout the weights came from, so converting back writes the
same layout, the dtype the leaves are stored in and, for a quantized checkpoint, the recipe
("quantization": model/quantization.py), which says which leaves are stored as qvalue and scale
(checkpoints/keys.py) and in which dtypes.

A stacked leaf (say blocks/layer_0/moe/wi_gate, [blocks, E, D, F]) gathers one HF tensor per
block, so no whole leaf may exist in memory during a conversion. `save_streamed` therefore hands
Orbax a tree of `LeafSpec`s (shape and dtype, no data) and a handler that subclasses Orbax's own
numpy handler: it opens each leaf's TensorStore with exactly the spec the stock handler would
build, then lets a `fill` coroutine write it slab by slab. The handler keeps the stock type string,
so the checkpoint's metadata is ordinary numpy leaves: a stock Orbax restore reads it, with target
shardings or without. The one choice we make is the write shape (Orbax's "local shard" shape,
which its chunks divide): one slab, so each slab lands on whole chunks and nothing is rewritten.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import traverse_util

from checkpoints.errors import CheckpointError, quiet_orbax
from checkpoints.hf import read_config, read_json
from checkpoints.keys import LAYOUTS, Path as LeafPath
from model.config import PARAM_DTYPES, Config, to_hf
from model.quantization import RECIPES

Stores = dict[LeafPath, ts.TensorStore]
PARAMS, META, FORMAT = "params", "checkpoint.json", "llama4-jax/1"


def is_orbax_dir(path: Path) -> bool:
    return (path / META).is_file() and (path / PARAMS).is_dir()


def reason(e: Exception) -> str:
    """A TensorStore error's first line, without the multi-kilobyte spec it appends."""
    return str(e).splitlines()[0].split(" [tensorstore_spec=")[0]


def read_error(e: BaseException | None) -> ValueError | None:
    """The ValueError that TensorStore raises for missing or damaged chunks, found in the chain
    of exceptions that Orbax wraps around it; None when the failure is something else."""
    while e is not None and not isinstance(e, ValueError):
        e = e.__cause__ or e.__context__
    return e


def write_meta(directory: Path, cfg: Config, layout: str, dtype: np.dtype,
               recipe: str | None = None) -> dict:
    """Write config.json and checkpoint.json; returns what checkpoint.json holds."""
    (directory / "config.json").write_text(json.dumps(to_hf(cfg), indent=2) + "\n")
    meta = {"format": FORMAT, "hf_layout": layout, "param_dtype": np.dtype(dtype).name}
    if recipe is not None:
        meta["quantization"] = recipe
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(directory: Path) -> tuple[Config, str, np.dtype, dict]:
    """(config, HF layout, stored dtype, checkpoint.json) of an Orbax directory written by this
    package; a field that is missing or not one we write is one error naming it."""
    path = directory / META
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    for field, allowed in (("hf_layout", sorted(LAYOUTS)), ("param_dtype", list(PARAM_DTYPES))):
        if field not in meta:
            raise CheckpointError(f"{path} has no {field!r} field")
        if meta[field] not in allowed:
            raise CheckpointError(f"{path}: {field} {meta[field]!r} is not one of {allowed}")
    if meta.get("quantization", RECIPES[0]) not in RECIPES:
        raise CheckpointError(f"{path}: quantization {meta['quantization']!r} is not one of "
                              f"{list(RECIPES)}")
    return (read_config(directory / "config.json"), meta["hf_layout"],
            np.dtype(meta["param_dtype"]), meta)


@dataclass(frozen=True)
class LeafSpec:
    """A leaf to be written by `fill`: global shape, dtype, and the shape of one write."""
    shape: tuple[int, ...]
    dtype: np.dtype
    write_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:  # Orbax sizes its I/O budget from this
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _leaf_path(info) -> LeafPath:
    return tuple(str(k.key) for k in info.keypath)


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Writes `LeafSpec` leaves through `fill`; reads back as the stock numpy handler does."""

    def __init__(self, fill: Callable[[Stores], Awaitable[None]]):
        super().__init__()
        self._fill = fill

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._open_and_fill(values, infos, args), name="llama4_streaming_save")]

    async def _open_and_fill(self, values, infos, args):
        async def open_one(spec: LeafSpec, info, arg):
            await info.await_path_creation()
            ocdbt = info.is_ocdbt_checkpoint
            tspec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=ocdbt, global_shape=spec.shape, local_shape=spec.write_shape,
                dtype=np.dtype(spec.dtype), process_index=jax.process_index() if ocdbt else None,
                arg=arg)
            return await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)

        # Concurrently: each open commits the array's metadata, and one at a time they crawl.
        stores = await asyncio.gather(*map(open_one, values, infos, args))
        await self._fill({_leaf_path(info): t for info, t in zip(infos, stores)})


class _LazyHandler(ocp.type_handlers.NumpyHandler):
    """Opens each leaf's TensorStore without reading it, so a leaf can be read a slab at a time.

    One open at a time: when one fails, no others are left in flight to call back into Orbax's
    closed event loop (each of which would print a traceback).
    """

    async def deserialize(self, infos, args=None):
        stores = []
        for info in infos:
            await info.await_path_creation()
            tspec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
            stores.append(await ts.open(ts.Spec(tspec), open=True, context=info.ts_context))
        return stores


class _LazyArrayHandler(_LazyHandler):
    """The same for leaves that were saved from jax.Arrays (by `save`)."""

    def typestr(self) -> str:
        return ocp.type_handlers.ArrayHandler().typestr()


def _handler(*extra) -> ocp.PyTreeCheckpointHandler:
    """A handler whose registry adds `extra` (type, handler) pairs to the stock array handlers.

    Our handlers share NumpyHandler's type string, so each replaces it for lookups by name (only
    restores look up by name); each registry serves the one save or restore it was made for.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()), *extra)
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save_streamed(directory: Path, specs: dict[LeafPath, LeafSpec],
                  fill: Callable[[Stores], Awaitable[None]]):
    """Create the Orbax checkpoint `directory` with leaves `specs`, their data written by `fill`."""
    directory = Path(directory).absolute()  # Orbax refuses relative paths
    with quiet_orbax(), ocp.Checkpointer(_handler((LeafSpec, _StreamingHandler(fill)))) as ckptr:
        ckptr.save(directory, args=ocp.args.PyTreeSave(traverse_util.unflatten_dict(specs)))


def save(directory: Path, params: Any):
    """Save an in-memory parameter tree with the stock handlers."""
    directory = Path(directory).absolute()  # Orbax refuses relative paths
    with quiet_orbax(), ocp.Checkpointer(_handler()) as ckptr:
        ckptr.save(directory, args=ocp.args.PyTreeSave(params))


def restore(directory: Path, shapes: dict[LeafPath, tuple[int, ...]],
            dtypes: dict[LeafPath, np.dtype], shardings: dict[LeafPath, jax.sharding.Sharding],
            under: LeafPath = (), where: Path | None = None) -> dict:
    """The stored arrays as jax.Arrays (nested by path), each read straight into its sharding
    and dtype (a quantized leaf's qvalue and scale are two of them: keys.flat_arrays). `under`:
    the parameters are the subtree at these keys of a larger tree (a training run's state), and
    only they are read. Missing or damaged data is one CheckpointError naming `where`."""
    directory = Path(directory).absolute()  # Orbax refuses relative paths
    args = {under + p: ocp.ArrayRestoreArgs(restore_type=jax.Array, dtype=dtypes[p],
                                            sharding=shardings[p], global_shape=shape)
            for p, shape in shapes.items()}
    item = {under + p: jax.ShapeDtypeStruct(shape, dtypes[p]) for p, shape in shapes.items()}
    try:
        with quiet_orbax(), ocp.Checkpointer(_handler()) as ckptr:
            tree = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
                item=traverse_util.unflatten_dict(item),
                restore_args=traverse_util.unflatten_dict(args), partial_restore=bool(under)))
    except Exception as e:  # noqa: BLE001 (Orbax wraps TensorStore's error in a bare Exception)
        cause = read_error(e)
        if cause is None:
            raise
        raise CheckpointError(f"{where or directory}: cannot read the parameters "
                              f"({reason(cause)})") from None
    for key in under:
        tree = tree[key]
    return tree


def open_lazy(directory: Path) -> Stores:
    """Every leaf as an opened TensorStore: read any slice with `stores[path][idx].read()`."""
    directory = Path(directory).absolute()  # Orbax refuses relative paths
    # Leaves are looked up by the type string they were saved with, and here both strings map to
    # lazy handlers (the later entry wins). The stock jax.Array entry only keeps Orbax from
    # warning that it has none; the class keying the lazy one is a value no leaf has.
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()), (np.ndarray, _LazyHandler()),
        (_LazyArrayHandler, _LazyArrayHandler()))
    with quiet_orbax(), \
            ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        return traverse_util.flatten_dict(ckptr.restore(directory))
