"""How a call runs the model: one frozen `Runtime`, resolved once per call by `resolve`.

model/'s modules say what Llama 4 computes, over one declared parameter tree (the stored one, its
layers stacked by block) and one KV-cache structure. A Runtime says how one call computes it, and
goes into the jitted functions and the modules as a single static argument:

- phase: "train", "prefill" (a whole sequence, or a prompt piece into the cache) or "decode"
  (one token per row).
- layout: how the stored tree is read. "stacked": the blocks are scanned (accelerators, meshes,
  training). On one CPU device inference reads split views of the same arrays instead
  (`kernels.views`): "blocks", each block's weights a buffer of its own, the blocks unrolled;
  "experts", each expert's too, for decoding. Same names and shapes: only the leaves' container
  differs. Unrolled programs compile in time about proportional to their size, so the views are
  taken for up to MAX_BLOCKS blocks and "experts" for up to MAX_BRANCHES switch branches (MoE
  layers x experts); `python -m experiments.bench_layouts --layers 48` times the compiles.
- attention: "xla" (one masked softmax, or blocks with an online softmax past `dense_max_len`
  keys), "cudnn" (the fused kernel; GPUs in 16-bit) or "context" (positions split over devices:
  the placement runs attention across them around the xla kernels).
- experts: "ragged" (grouped GEMM, jax.lax.ragged_dot), "rounds" (CPU, which has no fast
  ragged_dot), "switched" (the "experts" layout: each token copy to its expert's own buffers) or
  "dense" (the reference: every expert on every token).
- placement: the sharding plan, built by sharding/ (model/ names no mesh axis), or None.

`resolve` is the only place that asks which backend this is. A reader who only wants the model
can skip this file and model/kernels/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import jax

from . import kv_cache
from .config import Config
from .kernels import views
from .kernels.attention import BLOCK, DENSE_MAX_LEN

PHASES = ("train", "prefill", "decode")
LAYOUTS = ("stacked", "blocks", "experts")
ATTENTION = ("xla", "cudnn", "context")
EXPERTS = ("ragged", "rounds", "switched", "dense")

MAX_BLOCKS = 4
MAX_BRANCHES = 256


class Placement(Protocol):
    """What a sharded call needs from its sharding plan (`sharding.Plan` implements it)."""

    def constrain(self, x, logical: tuple[str | None, ...]): ...
    def put(self, x, logical: tuple[str | None, ...], what: str = "array"): ...
    def init_cache(self, cfg: Config, batch: int, max_len: int): ...
    def splits(self, logical: str) -> bool: ...
    def dispatch_experts(self, body, xs, ids, wi_gate, wi_up, wo): ...
    def gathered_attention(self, local, q, k, v, positions): ...
    def cache_state(self, local, qg, q_pos, layer_cache, chunk, **kw): ...


@dataclass(frozen=True)
class Runtime:
    phase: str = "train"
    layout: str = "stacked"
    attention: str = "xla"
    experts: str = "ragged"
    placement: Any = None           # a Placement, or None on one device
    cache_empty: bool = False       # a prompt's first piece: attention skips the (empty) cache
    dense_max_len: int = DENSE_MAX_LEN  # up to this many keys one masked softmax; beyond, blocks
    block: int = BLOCK                  # keys per block of the blockwise attention

    def __post_init__(self):
        for field, allowed in (("phase", PHASES), ("layout", LAYOUTS), ("attention", ATTENTION),
                               ("experts", EXPERTS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"runtime {field} {getattr(self, field)!r}: choose from {allowed}")
        if (self.layout == "experts") != (self.experts == "switched"):
            raise ValueError("the 'switched' expert kernel reads the 'experts' layout's views, and "
                             f"only it does: got layout {self.layout!r}, experts {self.experts!r}")
        if self.placement is not None and self.layout != "stacked":
            raise ValueError("a sharded call reads the stacked layout (the sharding rules name "
                             f"its axes), not {self.layout!r}")

    def replace(self, **kw) -> "Runtime":
        return dataclasses.replace(self, **kw)

    def writes_cache_first(self, chunked: bool) -> bool:
        """Whether a layer (`chunked`: of a RoPE layer's ring buffer) writes its new keys and
        values into its own block's buffers before it reads them, in the split layouts. Then XLA
        updates the buffers in place; read first and written after, it copies them (a copy of the
        whole context per prompt piece, for a global layer). Writing first is safe where no slot
        written holds a key still needed: decoding (one token a row), and a global layer's
        buffer, which never wraps. A chunked ring may wrap within a prompt piece: there the piece's
        keys are attended beside the buffer and written after, a copy bounded by the chunk. The
        stacked layout writes every layer's new keys once, after the layer scan."""
        return self.layout != "stacked" and (self.phase == "decode" or not chunked)

    def constrain(self, x, logical: tuple[str | None, ...]):
        """Pin activation x to logical axes; a no-op on one device."""
        return x if self.placement is None else self.placement.constrain(x, logical)

    def view_params(self, params):
        """The params as this runtime reads them (split views, or as they are)."""
        return params if self.layout == "stacked" else views.split_params(params, self.layout)

    def init_cache(self, cfg: Config, batch: int, max_len: int):
        """An empty KV cache as this runtime reads it: placed by the placement, or in the split
        layouts each block's buffers made on their own (split from a stacked cache they would
        be copied, the whole cache held twice)."""
        if self.placement is not None:
            return self.placement.init_cache(cfg, batch, max_len)
        if self.layout == "stacked":
            return kv_cache.init_cache(cfg, batch, max_len)
        return views.join([kv_cache.init_cache(cfg, batch, max_len, stacked=False)
                           for _ in range(cfg.text.num_blocks)])

    def view_cache(self, cache):
        """A KV cache (model.kv_cache) held as this runtime's layout reads it."""
        return views.stack(cache) if self.layout == "stacked" else views.split(cache)


def resolve(cfg: Config, phase: str, placement: Placement | None = None, *,
            experts: str | None = None, layout: str | None = None,
            backend: str | None = None) -> Runtime:
    """The Runtime for `phase` of `cfg` on this backend (or `backend`) and placement. `experts`
    and `layout` override the choice (e.g. experts="dense" runs the reference MoE); the "experts"
    layout falls back to "blocks" for any expert kernel but its own."""
    backend = backend or jax.default_backend()
    t = cfg.text
    chosen = "stacked"
    if phase != "train" and placement is None and backend == "cpu" and t.num_blocks <= MAX_BLOCKS:
        fits = len(t.moe_layers) * t.num_experts <= MAX_BRANCHES
        chosen = "experts" if phase == "decode" and fits else "blocks"
    if layout is None:
        layout = "blocks" if chosen == "experts" and experts not in (None, "switched") else chosen
    if experts is None:
        experts = "switched" if layout == "experts" else "rounds" if backend == "cpu" else "ragged"
    attention = "cudnn" if backend == "gpu" and cfg.dtype in ("bfloat16", "float16") else "xla"
    if placement is not None and (placement.splits("seq") or placement.splits("cache_seq")):
        attention = "context"
    return Runtime(phase=phase, layout=layout, attention=attention, experts=experts,
                   placement=placement)


# How a mesh becomes a Placement is sharding/'s business: it names mesh axes, and model/ imports
# nothing above it. sharding/ hands its placer over when it is imported (a mesh comes from it).
_PLACER = None


def set_placer(placer) -> None:
    """placer(cfg, params, batch, seq, mesh, rules) -> (Placement, params placed on the mesh)."""
    global _PLACER
    _PLACER = placer


def place(cfg: Config, params, batch: int, seq: int, mesh, rules="combined"):
    """(placement, params) for `batch` rows of `seq` positions on `mesh`; (None, params) when
    mesh is None."""
    if mesh is None:
        return None, params
    if _PLACER is None:
        raise ValueError("a mesh was given but sharding/ is not imported: `import sharding` and "
                         "build the mesh with sharding.make_mesh")
    return _PLACER(cfg, params, batch, seq, mesh, rules)
