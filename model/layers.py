"""Small building blocks: RMS norms, the SwiGLU MLP, and parameter declaration with logical axes."""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import flax.linen as nn


INIT_STD = 0.02
NORMAL = nn.initializers.normal(stddev=INIT_STD)  # every weight's initializer

# While model.init_params traces the modules abstractly, each parameter's initializer is noted
# here under its path, so that drawing the values needs no compiled forward pass.
_INITIALIZERS = contextvars.ContextVar("param_initializers", default=None)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
          init=NORMAL):
    """Declare a parameter with its logical axis names (mapped to mesh axes only in sharding/)."""
    noted = _INITIALIZERS.get()
    if noted is not None:
        noted[(*module.scope.path, name)] = init
    dtype = jnp.dtype(module.cfg.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@contextlib.contextmanager
def noting_initializers():
    """Within: every `param` declared notes its initializer in the yielded {path: init}."""
    noted = {}
    token = _INITIALIZERS.set(noted)
    try:
        yield noted
    finally:
        _INITIALIZERS.reset(token)


# The sharding plan (built by sharding/) in force while a sharded function is traced; None: one
# device. The model names only logical axes; the plan maps them to mesh axes.
_PLAN = contextvars.ContextVar("sharding_plan", default=None)


@contextlib.contextmanager
def sharding_plan(plan):
    """Trace the model under `plan` (None: no sharding). Set it inside the jitted function, with
    the plan a static argument, so that the compiled program and the plan always agree."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def current_plan():
    return _PLAN.get()


def place_on_mesh(cfg, params, batch: int, mesh, rules="combined"):
    """(plan, params) for a batch of `batch` rows on `mesh`, built by sharding/ (params already
    placed by sharding.shard_params stay where they are); (None, params) when mesh is None."""
    if mesh is None:
        return None, params
    import sharding  # the mesh rules live there: model code names no mesh axis
    plan = sharding.make_plan(cfg, mesh, rules, batch=batch)
    return plan, sharding.shard_params(cfg, params, mesh, rules)


def constrain(x, axes: tuple[str | None, ...]):
    """Pin activation x to logical axes (with_sharding_constraint); a no-op without a plan."""
    plan = _PLAN.get()
    return x if plan is None else plan.constrain(x, axes)


def rms_normalize(x, eps: float):
    """x / rms(x) over the last axis, in fp32, cast back (Llama 4's QK norm has no weight)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    cfg: object
    eps: float

    @nn.compact
    def __call__(self, x):  # [..., D]
        scale = param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
        return rms_normalize(x, self.eps) * scale.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense FFN and the always-on shared expert."""
    cfg: object
    hidden: int

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        D, F = x.shape[-1], self.hidden
        wi_gate = param(self, "wi_gate", (D, F), ("embed", "mlp"))
        wi_up = param(self, "wi_up", (D, F), ("embed", "mlp"))
        wo = param(self, "wo", (F, D), ("mlp", "embed"))
        return swiglu(x, wi_gate, wi_up, wo)


def merge_heads(x, w):
    """x [B, T, N, H] @ w [N, H, D] -> [B, T, D], contracting N then H as both lie in memory.
    (jnp.einsum("BTNH,NHD->BTD") contracts H first, sorting the letters, and XLA then copies the
    weight transposed before every matmul.)"""
    return jnp.tensordot(x, w.astype(x.dtype), axes=2)


def swiglu(x, wi_gate, wi_up, wo):
    """down(silu(x @ gate) * (x @ up)) for x [..., D], weights [D, F], [D, F], [F, D], computed
    in x's dtype."""
    dt = x.dtype
    h = jax.nn.silu(jnp.einsum("...D,DF->...F", x, wi_gate.astype(dt)))
    h = h * jnp.einsum("...D,DF->...F", x, wi_up.astype(dt))
    return jnp.einsum("...F,FD->...D", h, wo.astype(dt))
