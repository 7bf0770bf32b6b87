"""Distillation: a student learns from a frozen teacher (any Llama 4 config, deeper or wider or
not, with the student's vocabulary) and from the data, on SFT's data (text or chat).

Per target token t (the data's next token y_t), with p^tau = softmax(logits / tau) and tau
`--distill-temperature`:

    hard_t = -log p_S(y_t)                           the data's token (SFT's loss)
    soft_t = tau^2 * KL(p_T^tau || p_S^tau)          Hinton et al. 2015; tau^2 keeps the soft
                                                     gradients' scale as tau changes
    loss   = sum_t m_t [(1 - w_t) hard_t + w_t soft_t] / sum_t m_t    (+ the router loss)

The teacher's logits are computed on the fly, in the same step, from the batch's tokens (its
params are a frozen argument of the step: no gradient, not donated, split over the mesh like the
student's). Meta's Behemoth co-distillation "dynamically balances soft and hard targets through
training" without saying how; the soft weight w follows one of these rules (`--distill-rule`),
held out of the gradient:

- fixed: w = soft_weight (`--soft-weight`) for every token and step: the baseline.
- gradnorm: one w per step, w = G_hard / (G_hard + G_soft), where G is the norm of that term's
  gradient with respect to the student's logits over the batch's targets (in closed form:
  p_S - onehot(y) for hard_t, tau * (p_S^tau - p_T^tau) for soft_t). Then (1 - w) G_hard =
  w G_soft: both terms move the logits by the same amount. As the student closes on the
  teacher G_soft shrinks and w grows; when the data's tokens surprise it, w falls.
- confidence: w_t = p_T(y_t) at tau 1, per token: the teacher's soft targets where it predicts
  the data's token, the data's token where the teacher is wrong (the weight changes with the
  data, not the step).
Logged: `ce` (the hard loss), `kl` (KL at tau, without tau^2), `soft_weight` (mean w over the
targets), `teacher_ce` (the teacher's own loss on the batch: the floor the student can reach).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

import model
import sharding

from .data import Batches, read_token_data
from .objective import add_router_loss, decode, token_logprobs
from .settings import SettingsError, require_number

RULES = ("fixed", "gradnorm", "confidence")


def soft_targets_kl(student_logits, teacher_logits, temperature: float):
    """KL(p_T^tau || p_S^tau) per position [B, T] (nats, without the tau^2 factor)."""
    s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def soft_weight(rule: str, fixed: float, student_logits, teacher_logits, targets, mask,
                temperature: float):
    """w, [] or [B, T], held out of the gradient (see the module docstring)."""
    if rule == "fixed":
        return jnp.float32(fixed)
    if rule == "confidence":
        return jnp.exp(token_logprobs(teacher_logits, targets))
    p = jax.nn.softmax(student_logits, axis=-1)
    hard = p - jax.nn.one_hot(targets, p.shape[-1], dtype=p.dtype)
    soft = temperature * (jax.nn.softmax(student_logits / temperature, axis=-1)
                          - jax.nn.softmax(teacher_logits / temperature, axis=-1))
    g_hard, g_soft = (jnp.sqrt(jnp.sum(jnp.sum(g * g, axis=-1) * mask)) for g in (hard, soft))
    return jax.lax.stop_gradient(g_hard / jnp.maximum(g_hard + g_soft, 1e-12))


@dataclass(frozen=True)
class Distill:
    """`teacher`: (cfg, params) of the frozen teacher, whose vocabulary is the student's."""
    teacher: tuple
    distill_rule: str = "gradnorm"
    soft_weight: float = 0.5       # the fixed rule's w
    distill_temperature: float = 2.0
    teacher_path: str = ""         # recorded with the checkpoints (a resume refuses another)
    name = "distill"
    rows_per_item = 1
    read_data = staticmethod(read_token_data)

    def __post_init__(self):
        if self.distill_rule not in RULES:
            raise SettingsError(f"distill_rule (--distill-rule) must be one of {list(RULES)}, "
                                f"got {self.distill_rule!r}")
        require_number(self, "soft_weight", 0, 1)
        require_number(self, "distill_temperature", 0, open_low=True)

    def record(self) -> dict:
        return {"name": self.name, "rule": self.distill_rule, "soft_weight": self.soft_weight,
                "temperature": self.distill_temperature, "teacher": self.teacher_path}

    def frozen(self) -> dict:
        return {"teacher": self.teacher}

    def source(self, cfg, rows, run, plan):
        return Batches(rows, run.batch, run.seed)

    def loss(self, cfg, rt, plan):
        t_cfg = self.teacher[0]
        # The teacher runs on the student's mesh, by the student's resolved rules (the loop
        # places its params by the same table), checked against its own heads and experts.
        t_rt = model.resolve(t_cfg, "train",
                             None if plan is None else sharding.make_plan(t_cfg, plan.mesh,
                                                                          plan.rules))
        tau = self.distill_temperature

        def f(params, batch, frozen):
            tokens = batch["tokens"]
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            m = batch["weights"][:, 1:].astype(jnp.float32)
            n = jnp.maximum(jnp.sum(m), 1.0)
            logits, intermediates = decode(cfg, rt, params, inputs)
            teacher = jax.lax.stop_gradient(decode(t_cfg, t_rt, frozen["teacher"], inputs)[0])
            hard = -token_logprobs(logits, targets)
            kl = soft_targets_kl(logits, teacher, tau)
            w = soft_weight(self.distill_rule, self.soft_weight, logits, teacher, targets, m, tau)
            mean = lambda x: jnp.sum(x * m) / n  # noqa: E731
            w_tokens = jnp.broadcast_to(w, m.shape)
            loss = mean((1 - w_tokens) * hard + w_tokens * tau ** 2 * kl)
            metrics = {"ce": mean(hard), "kl": mean(kl), "soft_weight": mean(w_tokens),
                       "teacher_ce": mean(-token_logprobs(teacher, targets)),
                       "targets": jnp.sum(m)}
            return add_router_loss(cfg, loss, metrics, intermediates, batch["real"][:, :-1])
        return f
