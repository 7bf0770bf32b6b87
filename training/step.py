"""The optimizer and the jitted train step.

State is a plain dict pytree (what Orbax saves): step, params (fp32 master weights; compute runs
in cfg.dtype, bf16 on accelerators), opt_state, and rng (raw uint32 key data). The rng is split
every step and saved, so stochastic features (none in Llama 4 text training today: no dropout,
router jitter 0) would resume exactly too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

import model
from model.config import Config

from .objective import loss_fn
from .objectives import SFT
from .settings import SettingsError, require_int, require_number


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio at `steps`
    warmup: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0              # global-norm gradient clipping

    def __post_init__(self):
        # A negative lr or clip trains uphill, and lr * weight_decay >= 1 scales every weight by
        # 1 - lr * weight_decay <= 0 each step (decoupled decay): both refused. Finite values that
        # still diverge are caught by the step itself (see make_train_step).
        require_number(self, "lr", 0, open_low=True)
        require_number(self, "clip", 0, open_low=True)
        require_number(self, "weight_decay", 0)
        require_number(self, "min_lr_ratio", 0, 1)
        require_number(self, "b1", 0, 1, open_high=True)
        require_number(self, "b2", 0, 1, open_high=True)
        require_int(self, "warmup", 0)
        require_int(self, "steps", 1)
        if self.lr * self.weight_decay >= 1:
            raise SettingsError(f"lr x weight_decay = {self.lr * self.weight_decay:g} >= 1 would "
                                f"scale every weight by {1 - self.lr * self.weight_decay:g} each "
                                "step; lower --lr or --weight-decay")


def schedule(o: OptimConfig):
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, warmup_steps=max(o.warmup, 1), decay_steps=max(o.steps, o.warmup + 1),
        end_value=o.lr * o.min_lr_ratio)


def _decay_mask(params):
    # No weight decay on norm scales (they sit at 1, not 0).
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(p, "key", None) == "scale" for p in path), params)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(o.clip),
        optax.adamw(schedule(o), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=_decay_mask))


def init_state(params, opt: optax.GradientTransformation, seed: int):
    """The state at step 0 (fp32 master weights); jitted, as eager init compiles op by op."""
    @jax.jit
    def init(params):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params),
                "rng": jax.random.key_data(jax.random.key(seed))}
    return init(params)


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(cfg: Config, o: OptimConfig, plan=None, state_shardings=None,
                    experts: str | None = None, objective=None):
    """(state, batch, frozen) -> (state, metrics); jitted, the state's buffers donated.
    metrics["finite"] [3] says whether the loss, the gradients and the new state are finite;
    where any is not, the state comes back unchanged. `objective` (training.objectives; SFT by
    default) gives the loss; `frozen` holds the params of the models it reads but does not train
    (its `frozen()`), not donated. With a `plan` (sharding.Plan) the model runs sharded as it
    says, and the new state keeps `state_shardings` (see `training.loop.state_shardings`) so that
    it can be donated to the next step. `experts` overrides the runtime's expert kernel (e.g.
    "dense", the reference)."""
    opt = make_optimizer(o)
    lr = schedule(o)
    rt = model.resolve(cfg, "train", plan, experts=experts)
    loss = (objective or SFT()).loss(cfg, rt, plan)
    out_shardings = None
    if plan is not None:
        out_shardings = (state_shardings, NamedSharding(plan.mesh, PartitionSpec()))

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=out_shardings)
    def train_step(state, batch, frozen=None):
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"], batch,
                                                                     frozen)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "rng": jax.random.key_data(rng)}
        # A step whose loss, gradients or new state are not finite changes nothing, so no state
        # that reaches a checkpoint holds NaN or inf; the loop stops on it (see loop.train).
        finite = jnp.stack([jnp.isfinite(metrics["loss"]), _all_finite(grads),
                            _all_finite((new["params"], new["opt_state"]))])
        # The verdict comes out of a conditional, which XLA does not fuse into its users: as a
        # plain scalar, the chain of per-leaf checks was copied into every leaf's select (the
        # quickstart model's step compiled in 18 CPU-seconds on XLA:CPU, 10 this way).
        ok = jax.lax.cond(jnp.all(finite), lambda: jnp.bool_(True), lambda: jnp.bool_(False))
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        metrics |= {"grad_norm": optax.global_norm(grads), "lr": lr(state["step"]),
                    "finite": finite}
        return new, metrics

    return train_step


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_step(cfg: Config, params, batch):
    return loss_fn(cfg, model.resolve(cfg, "train"), params, batch)[1]
