"""Expert parallelism: the dropless grouped MoE path inside a `jax.shard_map`.

Design (the simplest correct one): the experts are split over the `expert` mesh axis (and each
expert's hidden width F over `tensor`); token copies (one per token and chosen expert, already
scaled by the router score) are split over the batch axes. Inside the map,
1. each device all-gathers the copies (and their expert ids) of its expert group: the devices
   that differ only in their `expert` coordinate;
2. runs its E/X local experts on the token copies routed to them: sorted by local expert, the
   copies for other devices' experts sorted last and left out of every group, so each device
   pays only for its own experts' tokens (dropless: no capacity, nothing dropped);
3. sums the partial outputs over `tensor` (each device holds F/Y of the hidden units) and
   reduce-scatters them over `expert`: every token gets its experts' outputs back, on the device
   it came from.
When the batch is too small to be split over `expert` (one prompt) the tokens are already
replicated over the group: step 1 is skipped and step 3 is a psum.

Communication per MoE layer, with T tokens per device, k experts per token, width D, X = the
expert-axis size and b bytes a value: the all-gather receives (X-1)*k*T*D*b and the reduce-scatter
sends as much, plus an all-reduce of X*k*T*D*b over `tensor` when F is split (and for fp8
experts a max over `tensor` of one value per input row of each product: their fp8 scales). A ragged
all-to-all would move only the copies routed elsewhere (about 2*k*T*D*b*(X-1)/X) but needs
per-destination counts exchanged first and buffers sized for the worst case; the all-gather costs
X times more bytes, which is cheap within a host's NVLink domain or a TPU slice, and is exact and
simple. The weights' `fsdp` split is gathered before the map (by the partitioner, as everywhere
in FSDP).

Numerics equal the single-device path: each token copy goes through the same SwiGLU rows, the
other devices add exact zeros, and only the `tensor` sum over F reorders a floating-point sum.
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.kernels.quantized import FP8, rows_split
from model.quantization import child_axes, is_quantized


def expert_parallel(plan, body, xs, ids, wi_gate, wi_up, wo):
    """The routed experts' outputs [M, D] for token copies xs [M, D] going to experts ids [M]
    (M = B * seq * k, split as the batch). `body` is the single-device grouped kernel
    (model.kernels.experts.grouped): each device runs it on its local experts."""
    tok = plan.axes("batch") + plan.axes("seq")  # the copies' rows: [B, T] flattened
    ex = plan.axes("experts")
    hid = plan.axes("mlp")
    gather = tuple(a for a in ex if a in tok)         # expert axes the tokens are split over
    rest = tuple(a for a in ex if a not in tok)       # ... and those they are replicated over
    local = wi_gate.shape[0] // math.prod(plan.mesh.shape[a] for a in ex)
    tok_spec = P(tok or None)
    w_in, w_out = P(ex or None, None, hid or None), P(ex or None, hid or None, None)
    # a quantized weight (a qwix QArray) splits its qvalue and scale alike, the scale not on
    # the axes it reduces to size 1
    w_in, w_out = (_child_specs(s, w) for s, w in ((w_in, wi_gate), (w_out, wo)))

    def run(xs, ids, wi_gate, wi_up, wo):
        if gather:
            xs, ids = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (xs, ids))
        first = jax.lax.axis_index(ex) * local if ex else 0
        # fp8 weights take fp8 inputs scaled by each row's max (kernels/quantized.py): the down
        # projection's input rows are split over F here, their max taken across `hid`
        split = rows_split(lambda m: jax.lax.pmax(m, hid)) if is_fp8(wo) and hid else \
            contextlib.nullcontext()
        with split:
            y = body(xs, ids, wi_gate, wi_up, wo, first=first)
        if hid:
            y = jax.lax.psum(y, hid)
        if gather:
            y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
        if rest:
            y = jax.lax.psum(y, rest)
        return y

    # check_vma=False: the CPU kernel's rounds loop starts its carry from zeros that vary over no
    # mesh axis, and each round's output varies over the axes the weights are split over; the
    # varying-axes check rejects that loop (making it pass would take a pcast to mesh axes inside
    # a kernel that names none). The collectives above are spelled out, and autodiff stays
    # correct without the check.
    with jax.named_scope("expert_parallel"):
        return jax.shard_map(run, mesh=plan.mesh, in_specs=(tok_spec, tok_spec, w_in, w_in, w_out),
                             out_specs=tok_spec, check_vma=False)(xs, ids, wi_gate, wi_up, wo)


def is_fp8(w) -> bool:
    return is_quantized(w) and jnp.dtype(w.qtype) == FP8


def _child_specs(spec: P, w):
    if not is_quantized(w):
        return spec
    return jax.tree.map(lambda c: P(*child_axes(spec, w.shape, c.shape)), w)
