"""Small building blocks: RMS norms, the SwiGLU MLP, and parameter declaration with logical axes."""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import Config
from .kernels.quantized import dense, on_use


INIT_STD = 0.02
NORMAL = nn.initializers.normal(stddev=INIT_STD)  # every weight's initializer

# While model.init_params traces the modules abstractly, each parameter's initializer is noted
# here under its path, so that drawing the values needs no compiled forward pass.
_INITIALIZERS = contextvars.ContextVar("param_initializers", default=None)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
          init=NORMAL):
    """Declare a parameter with its logical axis names (mapped to mesh axes only in sharding/).

    When applied, the leaf given is returned as it is: an array, a split view of one
    (kernels/views.py `Parts`) or a quantized one (a qwix `QArray`, model/quantization.py), which
    Flax's own check would take for trees of arrays, after checking its shape against the
    declaration. Readers cast it with `kernels.quantized.dense`, which dequantizes a QArray."""
    if module.has_variable("params", name):
        value = nn.unbox(module.get_variable("params", name))
        if tuple(value.shape) != tuple(shape):
            where = "/".join((*module.scope.path, name))
            raise ValueError(f"parameter {where} has shape {tuple(value.shape)}; the config "
                             f"declares {tuple(shape)}")
        return value
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


# How each layer block is rematerialised in training (Config.remat), decoder and vision alike.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def rms_normalize(x, eps: float):
    """x / rms(x) over the last axis, in fp32, cast back (Llama 4's QK norm has no weight)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    cfg: Config
    eps: float

    @nn.compact
    def __call__(self, x):  # [..., D]
        scale = param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
        return rms_normalize(x, self.eps) * scale.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense FFN and the always-on shared expert."""
    cfg: Config
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
    return jnp.tensordot(x, dense(w, x.dtype), axes=2)


def swiglu(x, wi_gate, wi_up, wo, matmul=jnp.matmul, down=None):
    """down(silu(x @ gate) * (x @ up)) for x [..., D], weights [D, F], [D, F], [F, D]: the dense
    FFN and the shared expert; with a grouped or batched `matmul` (model/kernels/experts.py),
    every routed expert. `down`: the last product, when it differs from `matmul`. The weights
    are read as stored (arrays or QArrays) and cast, or dequantized, on use (kernels.quantized)."""
    up_proj, down_proj = on_use(matmul), on_use(down or matmul)
    h = jax.nn.silu(up_proj(x, wi_gate)) * up_proj(x, wi_up)
    return down_proj(h, wo)
