"""Dequantize on use: how a product reads a quantized weight or KV-cache buffer.

A quantized weight is the same leaf of the parameter tree under the same name, held as a qwix
`QArray` (qvalue + scale, a pytree; model/quantization.py makes them), and so is a quantized KV
cache buffer (model/kv_cache.py). Where a module or kernel reads one it calls `dense(w, dtype)`:
an array is cast to the compute dtype, a QArray dequantized into it (qvalue converted, times its
scale broadcast over the reduced axes or groups). The expert kernels pick the experts they read
before dequantizing (gathered, switched: only those are converted; grouped: one expert at a
time, so that a layer never holds its expert stack in float).

fp8 weights (the fp8_mixed recipe, Meta's FP8 checkpoint) take fp8 activations, as Meta's
fbgemm kernels and the checkpoint's `input_activations` (dynamic, per token) say: `on_use`
quantizes each activation row to float8_e4m3fn before the product, its max clamped to Meta's
upper bound 1200. Here that is fake quantization (to fp8 and back in the compute dtype), which
equals an fp8 GEMM with fp32 accumulation up to fp32 rounding.

What XLA makes of it: the convert and the scale multiply are elementwise ops on the weight,
which XLA fuses with each other and, for a gathered weight, with the gather. XLA:CPU does not
fuse them into the dot: it writes the dequantized weight out and then multiplies, so on this
CPU a quantized decode step is not cheaper than the fp32 one (measured: `python -m
experiments.bench_generate --quantize int8`). GPU compilers can fuse a convert into a dot's
operand (XLA:GPU's dot fusions read int8 and fp8 operands), which is where the bytes read drop
with the weights'. qwix.dot_general / ragged_dot, which multiply the raw qvalues and scale the
output, are the alternative; they would replace every product of the kernels with qwix's own,
for a gain this CPU cannot show, so the kernels keep one product and dequantize into it.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax.numpy as jnp
from qwix import QArray, dequantize

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0          # the largest finite float8_e4m3fn
ACTIVATION_UB = 1200.0   # llama-models' fp8_activation_scale_ub (llama4/quantization/loader.py)
ROW_MAX_FLOOR = 1e-12    # fbgemm's floor of a row's max (no division by zero)


def dense(w, dtype):
    """w as an array of `dtype`: a QArray dequantized in `dtype`, an array cast."""
    if isinstance(w, QArray):
        return dequantize(w.astype(dtype))  # astype casts the scale: the product runs in dtype
    return w.astype(dtype)


# Within `rows_split`: how a row's max over its local part becomes the whole row's max.
_ROW_MAX = contextvars.ContextVar("fp8_row_max", default=None)


@contextlib.contextmanager
def rows_split(whole_max):
    """Within (while a sharded body is traced): the rows that fp8 products take may be split
    over devices along K (the experts' hidden width F split over `tensor`), and `whole_max`
    (local max -> the row's max, a collective) makes each row's scale the whole row's. Rows held
    whole on every device give their own max back, so every product may take it."""
    token = _ROW_MAX.set(whole_max)
    try:
        yield
    finally:
        _ROW_MAX.reset(token)


def fp8_rows(x):
    """x [..., K] quantized to float8_e4m3fn per row and back (fbgemm's quantize_fp8_per_row
    with Meta's upper bound): scale = clip(max |row|, 1e-12, 1200) / 448, values clipped."""
    x32 = x.astype(jnp.float32)
    row_max = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    if (whole_max := _ROW_MAX.get()) is not None:
        row_max = whole_max(row_max)
    row_max = jnp.clip(row_max, ROW_MAX_FLOOR, ACTIVATION_UB)
    q = jnp.clip(x32 * (FP8_MAX / row_max), -FP8_MAX, FP8_MAX).astype(FP8)
    return (q.astype(jnp.float32) * (row_max / FP8_MAX)).astype(x.dtype)


def on_use(matmul):
    """matmul(x, w) -> the same for w an array or a QArray, contracting x's last axis:
    the weight dequantized into x's dtype; an fp8 weight's input rows quantized to fp8 first."""
    def product(x, w):
        if isinstance(w, QArray) and jnp.dtype(w.qtype) == FP8:
            x = fp8_rows(x)
        return matmul(x, dense(w, x.dtype))
    return product
