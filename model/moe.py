"""Mixture of experts: a sigmoid top-k router whose score scales the routed expert's *input*,
plus an always-on shared expert that sees the unscaled input.

The router picks k experts per token by logit and scores each by the sigmoid of its logit (no
softmax, no renormalisation). Each token copy, scaled by its score, goes through its expert's
SwiGLU; the copies' outputs are summed per token and added to the shared expert's output.

Ablation variants (config fields; the defaults are Llama 4): `router_score="output"` scales the
expert's output by the score instead (Switch, Mixtral); `router_activation="softmax"` scores an
expert by its softmax probability over all E logits (Switch; not renormalised over the k chosen,
which for k = 1 would make every score 1 and leave the router without a gradient);
`shared_expert=False` drops the shared expert (its parameters too).

How the routed experts run (sorted by expert, switched per copy, all of them densely,
expert-parallel on a mesh) is the runtime's kernel choice: model/kernels/experts.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import Config
from .kernels import experts
from .kernels.quantized import dense
from .layers import MLP, param
from .runtime import Runtime

# The logical axes of each routed expert's weights [E, D, F], [E, D, F], [E, F, D], after "experts".
EXPERT_AXES = dict(zip(experts.EXPERT_WEIGHTS,
                       (("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed"))))


class MoE(nn.Module):
    cfg: Config
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        t = self.cfg.text
        D, F, E, k = t.hidden_size, t.intermediate_size, t.num_experts, t.experts_per_token
        size = {"embed": D, "mlp": F}
        dt = x.dtype
        B, T, _ = x.shape
        xt = x.reshape(B * T, D)
        router = param(self, "router", (D, E), ("embed", "experts"))
        logits = jnp.einsum("TD,DE->TE", xt, dense(router, dt))
        top_logits, top_ids = jax.lax.top_k(logits, k)                      # [T, k]
        if t.router_activation == "softmax":
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            scores = jnp.take_along_axis(probs, top_ids, axis=-1).astype(dt)
        else:
            scores = jax.nn.sigmoid(top_logits.astype(jnp.float32)).astype(dt)
        # Router statistics for the load-balancing loss and per-expert load (training reads them).
        self.sow("intermediates", "router_logits", logits)
        # As stored: the kernel casts (or dequantizes) only the experts it reads.
        weights = tuple(param(self, name, (E, *(size[a] for a in axes)), ("experts", *axes))
                        for name, axes in EXPERT_AXES.items())
        # Llama 4's router score multiplies the expert's input, not its output (SwiGLU is not
        # homogeneous, so the two differ); the "output" variant scales the experts' output rows.
        xs = jnp.repeat(xt, k, axis=0)                  # [M, D]: a copy per (token, chosen expert)
        score = scores.reshape(-1, 1)                   # [M, 1]
        on_input = t.router_score == "input"
        routed = experts.run(xs * score if on_input else xs, top_ids.reshape(-1), weights, self.rt)
        routed = routed if on_input else routed * score
        routed = routed.reshape(B, T, k, D).sum(axis=2)
        if not t.shared_expert:
            return routed
        return MLP(self.cfg, F, name="shared")(x) + routed
