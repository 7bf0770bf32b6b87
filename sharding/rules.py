"""Rules tables (logical axis -> mesh axes), one per strategy, and the plan that applies them.

The model declares every parameter and pinned activation with logical axes (model/layers.py);
this file is the only place that maps them onto the mesh. A rule maps a logical axis to a tuple
of mesh axes (split over their product); a logical axis with no rule is replicated.

- fsdp: the model width ("embed") of every weight is split over `fsdp` and gathered just before
  use (ZeRO-3); the batch is split over data, fsdp and expert.
- tensor: attention heads, FFN and expert hidden widths, and the vocab (embedding table, LM head,
  logits) are split over `tensor` (Megatron-style); the per-device activations keep all of D.
- expert: the experts are split over `expert`; tokens meet their experts in a shard_map
  (sharding/moe.py).
- context: the positions of a sequence ("seq") and the KV cache's slots ("cache_seq") are split
  over `context`; attention across them runs in shard_maps (sharding/context.py).
- combined: all four at once; every mesh axis of size 1 is simply unused, so it suits any mesh.

Divisibility: query heads and experts must divide by the product of their mesh axes (an error
otherwise). KV heads are split over `tensor` when it divides them, and replicated otherwise
(tensor > K: each device keeps every KV head, a small cost next to the query heads, and no head
is split across devices). The batch is split over the leading batch axes whose sizes divide it
and replicated over the rest (greedy generation of one prompt on a data=2 mesh still runs).
A sequence split over `context` must divide by it (an error otherwise), except a single position
a row (decoding), which every device of the axis holds; so must the cache's slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import model
from model import kv_cache
from model.config import Config
from model.quantization import child_axes, is_quantized
from model.decoder import ACTIVATION

from . import context
from .mesh import AXES, ShardingError
from .moe import expert_parallel

BATCH = ("data", "fsdp", "expert")
_FSDP = {"embed": ("fsdp",), "vision_embed": ("fsdp",)}
_TENSOR = {"heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
           "vocab": ("tensor",), "vision_heads": ("tensor",), "vision_mlp": ("tensor",),
           "vision_adapter": ("tensor",)}
_EXPERT = {"experts": ("expert",)}
_CONTEXT = {"seq": ("context",), "cache_seq": ("context",)}
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "fsdp": {"batch": BATCH, **_FSDP},
    "tensor": {"batch": BATCH, **_TENSOR},
    "expert": {"batch": BATCH, **_EXPERT},
    "context": {"batch": BATCH, **_CONTEXT},
    "combined": {"batch": BATCH, **_FSDP, **_TENSOR, **_EXPERT, **_CONTEXT},
}


@lru_cache(maxsize=1)
def logical_axes() -> frozenset[str]:
    """Every logical axis the model names: its parameters' (as declared, for a model with every
    kind of layer and a vision tower), the residual stream's and the KV cache's."""
    every_kind = model.tiny(moe_layers=(1, 3)).replace(vision=model.VisionConfig(
        image_size=8, patch_size=4, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
        projector_input_dim=8, projector_output_dim=8, vision_output_dim=8))
    declared = model.param_axes(every_kind)
    params = {a for spec in jax.tree.leaves(declared, is_leaf=lambda x: isinstance(x, P))
              for a in spec if a is not None}
    cache = {a for axes in kv_cache.AXES.values() for a in axes}
    return frozenset(params | set(ACTIVATION) | cache)


def rules_table(rules: str | dict) -> dict[str, tuple[str, ...]]:
    """A rules table by strategy name, or a custom {logical: mesh axis or axes} dict, checked."""
    if isinstance(rules, str):
        if rules not in RULES:
            raise ShardingError(f"unknown sharding strategy {rules!r}; choose from {sorted(RULES)}")
        return dict(RULES[rules])
    table = {}
    for logical, mesh_axes in rules.items():
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        if logical not in logical_axes():
            raise ShardingError(f"rules: unknown logical axis {logical!r}; the model uses "
                                f"{sorted(logical_axes())}")
        bad = [a for a in mesh_axes if a not in AXES]
        if bad or len(set(mesh_axes)) != len(mesh_axes):
            raise ShardingError(f"rules: {logical!r} -> {mesh_axes}: mesh axes must be distinct "
                                f"names from {AXES}")
        table[logical] = mesh_axes
    return table


def _size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec(table, mesh: Mesh, logical, shape, what: str) -> P:
    """PartitionSpec over mesh axes for one array; refuses collisions and uneven splits."""
    used: dict[str, str] = {}
    out = []
    for name, n in zip(logical, shape):
        mesh_axes = table.get(name, ()) if name is not None else ()
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"{what}: logical axes {used[a]!r} and {name!r} are both "
                                    f"mapped onto mesh axis {a!r}; one array may use a mesh "
                                    "axis once")
            used[a] = name
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        k = _size(mesh, mesh_axes)
        if n % k:
            raise ShardingError(f"{what}: dimension {name!r} of size {n} is not divisible by "
                                f"mesh axes {'x'.join(mesh_axes)} of size {k}")
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


@lru_cache(maxsize=16)
def _param_tree(cfg: Config):
    """(paths, shapes, logical specs) of every parameter; tracing the init once per config."""
    shapes = model.param_shapes(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree.leaves(model.param_axes(cfg), is_leaf=lambda x: isinstance(x, P))
    paths = ["/".join(str(k.key) for k in path) for path, _ in leaves]
    return paths, [leaf.shape for _, leaf in leaves], specs, jax.tree.structure(shapes)


def _resolve(cfg: Config, mesh: Mesh, rules) -> dict[str, tuple[str, ...]]:
    """The rules table for this model on this mesh: checks heads and experts, drops the kv_heads
    rule when the KV heads do not divide (replicated, see the module docstring)."""
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"expected a jax.sharding.Mesh (sharding.make_mesh), got {type(mesh)}")
    missing = [a for a in AXES if a not in mesh.shape]
    if missing:
        raise ShardingError(f"mesh axes {tuple(mesh.shape)} lack {missing}; build meshes with "
                            "sharding.make_mesh")
    table = rules_table(rules)
    t = cfg.text
    for logical, count, what in (("heads", t.num_heads, "attention heads"),
                                 ("experts", t.num_experts, "experts")):
        k = _size(mesh, table.get(logical, ()))
        if count % k:
            axes = "x".join(table[logical])
            raise ShardingError(f"{count} {what} are not divisible by mesh axis {axes} of size "
                                f"{k}: choose a mesh whose {axes} size divides {count}")
    if t.num_kv_heads % _size(mesh, table.get("kv_heads", ())):
        table["kv_heads"] = ()
    return table


def seq_axes(mesh: Mesh, table, seq: int | None) -> tuple[str, ...]:
    """The mesh axes a sequence of `seq` positions a row is split over: none for one position
    (decoding: every device of the axis holds it); an error when it does not divide."""
    axes = tuple(a for a in table.get("seq", ()) if mesh.shape[a] > 1)
    k = _size(mesh, axes)
    if seq is None or k == 1 or seq == 1:
        return axes if seq != 1 else ()
    if seq % k:
        raise ShardingError(f"a sequence of {seq} positions does not split over mesh axis "
                            f"{'x'.join(axes)} of size {k}: choose a length (prefill_chunk, "
                            f"--seq) that is a multiple of {k}")
    return axes


def batch_axes(mesh: Mesh, table, batch: int | None) -> tuple[str, ...]:
    """The leading batch mesh axes whose product divides `batch` (all of them when None)."""
    out, k = [], 1
    for a in table.get("batch", ()):
        if batch is not None and batch % (k * mesh.shape[a]):
            break
        out.append(a)
        k *= mesh.shape[a]
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """A mesh, a resolved rules table and the batch split: what a sharded trace needs.

    Hashable, so it is a static argument of the jitted model functions: the model's Runtime
    carries it as its placement (model.runtime.Placement) and calls `constrain` and
    `dispatch_experts`.
    """
    mesh: Mesh
    table: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def rules(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes (of size > 1) a logical axis is split over."""
        return tuple(a for a in self.rules.get(logical, ()) if self.mesh.shape[a] > 1)

    def spec(self, logical, shape, what: str = "array") -> P:
        return _spec(self.rules, self.mesh, logical, shape, what)

    def sharding(self, logical, shape, what: str = "array") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape, what))

    def constrain(self, x, logical):
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape, "activation"))

    def splits(self, logical: str) -> bool:
        return bool(self.axes(logical))

    def dispatch_experts(self, body, xs, ids, wi_gate, wi_up, wo):
        return expert_parallel(self, body, xs, ids, wi_gate, wi_up, wo)

    def gathered_attention(self, local, q, k, v, positions):
        return context.gathered_attention(self, local, q, k, v, positions)

    def cache_state(self, local, qg, q_pos, layer_cache, chunk, **kw):
        return context.cache_state(self, local, qg, q_pos, layer_cache, chunk, **kw)

    def put(self, x, logical, what: str = "array"):
        """Host or device data -> a global array split as `logical` says (every process passes
        the same data; each keeps only its own shards)."""
        return _put(x, self.sharding(logical, np.shape(x), what))

    def cache_shardings(self, cache):
        """Shardings for a KV cache tree (model.kv_cache layout) of arrays or shape structs."""
        return {name: {n: self.leaf_sharding(kv_cache.AXES[n], a, f"cache {name}/{n}")
                       for n, a in layer.items()} for name, layer in cache.items()}

    def leaf_sharding(self, logical, a, what: str = "array"):
        """The sharding of array `a`; of a quantized one (an 8-bit cache buffer, a QArray) a
        QArray of its qvalue's and scale's (child_sharding)."""
        s = self.sharding(logical, a.shape, what)
        if is_quantized(a):
            return jax.tree.map(lambda c: child_sharding(s, a.shape, c.shape), a)
        return s

    def init_cache(self, cfg: Config, batch: int, max_len: int, dtype=None):
        """An empty KV cache created in place on the mesh (no device holds all of it)."""
        make = lambda: kv_cache.init_cache(cfg, batch, max_len, dtype)  # noqa: E731
        return jax.jit(make, out_shardings=self.cache_shardings(jax.eval_shape(make)))()


def make_plan(cfg: Config, mesh: Mesh, rules="combined", batch: int | None = None,
              seq: int | None = None) -> Plan:
    """The plan for `cfg` on `mesh` with a strategy's rules; `batch` and `seq` (rows and
    positions a row of the arrays it will run on) pick the batch and sequence splits."""
    table = _resolve(cfg, mesh, rules)
    table["batch"] = batch_axes(mesh, table, batch)
    table["seq"] = seq_axes(mesh, table, seq)
    return Plan(mesh, tuple(sorted(table.items())))


def param_shardings(cfg: Config, mesh: Mesh, rules="combined"):
    """A NamedSharding for every parameter (the tree of model.param_axes), checked to divide."""
    table = _resolve(cfg, mesh, rules)
    paths, shapes, specs, treedef = _param_tree(cfg)
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, _spec(table, mesh, tuple(spec), shape, path))
                                        for path, shape, spec in zip(paths, shapes, specs)])


def shard_params(cfg: Config, params, mesh: Mesh, rules="combined"):
    """Place `params` on the mesh (arrays already placed so are left where they are)."""
    shardings = param_shardings(cfg, mesh, rules)
    if set(params) != set(shardings):
        shardings = {k: shardings[k] for k in params if k in shardings}
        extra = sorted(set(params) - set(shardings))
        if extra:
            raise ShardingError(f"params hold {extra}, which this config does not declare")
    return jax.tree.map(_put_leaf, params, shardings, is_leaf=is_quantized)


def place(cfg: Config, params, batch: int, seq: int, mesh: Mesh, rules="combined"):
    """(plan, params placed) for `batch` rows of `seq` positions on `mesh` (params already placed
    so stay where they are): what model.forward and model.generate run a mesh with."""
    return make_plan(cfg, mesh, rules, batch, seq), shard_params(cfg, params, mesh, rules)


def child_sharding(sharding: NamedSharding, full, child) -> NamedSharding:
    """A quantized leaf's qvalue or scale (shape `child`) placed as its weight (shape `full`):
    the same split, but none on the axes the scale reduces to size 1."""
    return NamedSharding(sharding.mesh, P(*child_axes(sharding.spec, full, child)))


def _put_leaf(x, sharding: NamedSharding):
    """_put, for a quantized leaf (a QArray) its qvalue and scale: sharded with their weight."""
    if is_quantized(x):
        return jax.tree.map(lambda c: _put(c, child_sharding(sharding, x.shape, c.shape)), x)
    return _put(x, sharding)


def _put(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() > 1 and not (isinstance(x, jax.Array) and not x.is_fully_addressable):
        host = np.asarray(x)  # the same on every process: each takes the slices it owns
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.device_put(x, sharding)
