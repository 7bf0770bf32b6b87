"""GRPO (Shao et al. 2024, DeepSeekMath): online RL with a verifiable reward, as Meta describes
Llama 4's: prompts sampled by difficulty, prompts with no learning signal dropped.

Every `updates_per_rollout` steps a rollout is sampled from the current params by the KV-cache generator
(model.generate, between steps): `batch` x `oversample` candidate prompts from the task file
(training.tasks), `group` samples each at `sample_temperature`, each scored 1 or 0 exactly. Then:

- Advantages, per group of one prompt's samples: A_i = (r_i - mean r) / (std r + 1e-4)
  (std with ddof 0).
- Dropped: groups whose samples all score the same (A = 0: no learning signal). The first
  `batch` groups with a signal, in sampling order, make the batch; where fewer have one the
  rest of the batch is masked out (`groups_kept` says how many were kept).
- Difficulty: each prompt keeps a running pass rate p = (s + 1) / (n + 2) over its samples,
  successes s and attempts n decayed by `pass_rate_decay` at each visit (recent visits count most).
  Candidates are drawn without replacement with weight 1 - p^G - (1 - p)^G, the chance that
  a group of G samples holds both scores, i.e. carries a signal; unseen prompts (p = 1/2)
  come first. `sampling="uniform"`: every prompt alike (the baseline).
- Objective, per completion token t of sample i (the prompt is context), with
  ratio = pi / pi_old (pi_old: the params that sampled the rollout) and the k3 estimator
  KL_t = ref/pi - log(ref/pi) - 1 of KL(pi || ref) to the frozen reference:

      J_i = mean_t [ min(ratio A_i, clip(ratio, 1 - eps, 1 + eps) A_i) - kl_coef KL_t ]
      loss = -mean over the kept samples of J_i          (+ the router loss)

  Each rollout serves `updates_per_rollout` steps (the clip binds from the second); pi_old's and the
  reference's log-probs are computed once per rollout (training.scoring).

Resume is exact: the rollout of step s is a function of the params at its first step, the
seed, the step and the pass rates, and the pass rates are saved with every checkpoint (meta
"sampler"); checkpoints fall at whole rollouts (steps, --save-every and --stop-at are
multiples of `updates_per_rollout`). Logged: `pass_rate` (share of the rollout's samples that scored 1),
`groups_kept`, `kl` (mean KL_t), `clipped` (share of tokens whose ratio was clipped),
`completion_len`, `reward_std` (mean within-group std over the kept groups).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .data import pad_rows
from .objective import add_router_loss, decode, token_logprobs
from .scoring import score_tokens
from .settings import SettingsError, require_int, require_number
from .tasks import Tasks, completion, read_tasks, reward, sample
from .text import Document

SAMPLING = ("difficulty", "uniform")
ADV_EPS = 1e-4


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """rewards [K, G] -> advantages [K, G], normalised within each group (row)."""
    return (rewards - rewards.mean(-1, keepdims=True)) / (rewards.std(-1, keepdims=True)
                                                          + ADV_EPS)


def select_groups(rewards: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """rewards [K, G] of K candidate groups -> (the `batch` groups kept [batch], whether each has
    a signal [batch]): the first groups whose samples differ, in order; where fewer than `batch`
    do, silent groups fill the batch (to be masked out: a step's shapes are fixed)."""
    signal = np.flatnonzero(rewards.std(-1) > 0)
    silent = np.setdiff1d(np.arange(len(rewards)), signal)
    kept = np.concatenate([signal[:batch], silent[:max(batch - len(signal), 0)]])
    return kept, np.arange(batch) < len(signal)


def clipped_objective(logp, old_logp, ref_logp, advantages, mask, sample_mask, eps: float,
                      kl_coef: float):
    """The GRPO loss (the module docstring's) from token log-probs [B, T] under the policy, the
    sampling policy and the reference, advantages [B], mask [B, T] (completion targets) and
    sample_mask [B] (kept samples). Returns (loss, per-token KL [B, T], clipped [B, T])."""
    ratio = jnp.exp(logp - old_logp)
    A = advantages[:, None]
    clipped_ratio = jnp.clip(ratio, 1 - eps, 1 + eps)
    pg = jnp.minimum(ratio * A, clipped_ratio * A)
    log_r = ref_logp - logp
    kl = jnp.exp(log_r) - log_r - 1
    per_sample = jnp.sum((pg - kl_coef * kl) * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    loss = -jnp.sum(per_sample * sample_mask) / jnp.maximum(jnp.sum(sample_mask), 1.0)
    return loss, kl, (clipped_ratio * A < ratio * A)


@dataclass(frozen=True)
class GRPO:
    """`reference`: (cfg, params) of the frozen reference; `tokenizer` decodes samples."""
    reference: tuple
    tokenizer: object
    group: int = 8
    kl_coef: float = 0.04
    clip_ratio: float = 0.2
    updates_per_rollout: int = 1
    max_new_tokens: int = 16
    sample_temperature: float = 1.0
    oversample: int = 2
    sampling: str = "difficulty"
    pass_rate_decay: float = 0.5
    reference_path: str = ""     # recorded with the checkpoints (a resume refuses another)
    name = "grpo"

    @staticmethod
    def read_data(tok, paths, seq: int, pad_id: int) -> tuple[Tasks, str, str]:
        parts = [read_tasks(tok, p) for p in paths]
        tasks = Tasks(*(sum((getattr(t, f) for t in parts), []) for f in
                        ("prompts", "answers", "lines")))
        return tasks, "tasks", f"{len(tasks)} tasks"

    def __post_init__(self):
        for field, low in (("group", 2), ("updates_per_rollout", 1), ("max_new_tokens", 1),
                           ("oversample", 1)):
            require_int(self, field, low)
        require_number(self, "kl_coef", 0)
        require_number(self, "clip_ratio", 0, 1, open_low=True, open_high=True)
        require_number(self, "sample_temperature", 0, open_low=True)
        require_number(self, "pass_rate_decay", 0, 1)
        if self.sampling not in SAMPLING:
            raise SettingsError(f"sampling (--sampling) must be one of {list(SAMPLING)}, got "
                                f"{self.sampling!r}")

    @property
    def rows_per_item(self) -> int:
        return self.group

    def record(self) -> dict:
        keep = ("group", "kl_coef", "clip_ratio", "updates_per_rollout", "max_new_tokens",
                "sample_temperature", "oversample", "sampling", "pass_rate_decay")
        return {"name": self.name, "reference": self.reference_path,
                **{k: getattr(self, k) for k in keep}}

    def frozen(self) -> dict:
        return {}

    def source(self, cfg, tasks: Tasks, run, plan):
        return Rollouts(self, cfg, tasks, run, plan)

    def loss(self, cfg, rt, plan):
        def f(params, batch, frozen):
            tokens = batch["tokens"]
            mask = batch["weights"][:, 1:]
            logits, intermediates = decode(cfg, rt, params, tokens[:, :-1])
            logp = token_logprobs(logits, tokens[:, 1:])
            loss, kl, clipped = clipped_objective(
                logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], mask,
                batch["sample_mask"], self.clip_ratio, self.kl_coef)
            kept = batch["sample_mask"][:, None] * mask
            n = jnp.maximum(jnp.sum(kept), 1.0)
            metrics = {"grpo": loss, "pass_rate": jnp.mean(batch["sampled_rewards"]),
                       "groups_kept": jnp.sum(batch["sample_mask"]) / self.group,
                       "kl": jnp.sum(kl * kept) / n, "clipped": jnp.sum(clipped * kept) / n,
                       "completion_len": jnp.sum(mask) / mask.shape[0],
                       "reward_std": batch["reward_std"]}
            return add_router_loss(cfg, loss, metrics, intermediates, batch["real"][:, :-1])
        return f


class Rollouts:
    """The train loop's source of GRPO batches (see training.loop): a rollout sampled from the
    current params every `updates` steps, and the pass rates that choose its prompts."""

    def __init__(self, obj: GRPO, cfg, tasks: Tasks, run, plan):
        self.obj, self.cfg, self.tasks, self.run = obj, cfg, tasks, run
        self.mesh = None if plan is None else plan.mesh
        longest = max(len(p) for p in tasks.prompts)
        if longest + obj.max_new_tokens > run.seq + 1:
            raise SettingsError(f"seq (--seq) {run.seq}: the longest prompt ({longest} tokens) "
                                f"and {obj.max_new_tokens} new tokens need rows of "
                                f"{longest + obj.max_new_tokens}; raise --seq to at least "
                                f"{longest + obj.max_new_tokens - 1}")
        for field in ("save_every", "stop_at"):
            v = getattr(run, field)
            if v is not None and v % obj.updates_per_rollout:
                raise SettingsError(f"{field} (--{field.replace('_', '-')}) {v} is not a "
                                    "multiple of updates_per_rollout (--updates-per-rollout) "
                                    f"{obj.updates_per_rollout}: checkpoints must fall at whole "
                                    "rollouts for an exact resume")
        self.successes = np.zeros(len(tasks))
        self.attempts = np.zeros(len(tasks))
        self._step, self._batch = None, None

    def position(self, step: int) -> dict:
        return {"sampler": {"successes": self.successes.tolist(),
                            "attempts": self.attempts.tolist()}}

    def restore(self, meta: dict):
        self.successes = np.asarray(meta["sampler"]["successes"], np.float64)
        self.attempts = np.asarray(meta["sampler"]["attempts"], np.float64)

    def abstract(self) -> dict:
        rows, T = self.run.batch * self.obj.group, self.run.seq
        f32 = np.dtype(np.float32)
        return {"tokens": ((rows, T + 1), np.dtype(np.int32)), "weights": ((rows, T + 1), f32),
                "real": ((rows, T + 1), np.dtype(bool)), "advantages": ((rows,), f32),
                "sample_mask": ((rows,), f32), "old_logp": ((rows, T), f32),
                "ref_logp": ((rows, T), f32),
                "sampled_rewards": ((self.run.batch * self.obj.oversample * self.obj.group,), f32),
                "reward_std": ((), f32)}

    def pass_rate(self) -> np.ndarray:
        return (self.successes + 1) / (self.attempts + 2)

    def record(self, cand: np.ndarray, rewards: np.ndarray):
        """The running pass rates after candidates `cand` [K] scored rewards [K, G]."""
        for i, r in zip(cand, rewards):  # in order: a prompt drawn twice is decayed twice
            self.successes[i] = self.obj.pass_rate_decay * self.successes[i] + r.sum()
            self.attempts[i] = self.obj.pass_rate_decay * self.attempts[i] + len(r)

    def candidates(self, step: int) -> np.ndarray:
        K, P, G = self.run.batch * self.obj.oversample, len(self.tasks), self.obj.group
        w = np.ones(P)
        if self.obj.sampling == "difficulty":
            p = self.pass_rate()
            w = 1 - p ** G - (1 - p) ** G
        rng = np.random.default_rng([self.run.seed, step])
        return rng.choice(P, K, replace=K > P, p=w / w.sum())

    def batch_at(self, step: int, params) -> dict[str, np.ndarray]:
        start = step - step % self.obj.updates_per_rollout
        if self._step != start:
            if step != start:  # unreachable: checkpoints fall at whole rollouts (__init__)
                raise RuntimeError(f"step {step} is inside the rollout of step {start}, which "
                                   "was not sampled")
            self._batch, self._step = self._rollout(start, params), start
        return self._batch

    def _rollout(self, step: int, params) -> dict[str, np.ndarray]:
        o, tok, B, G = self.obj, self.obj.tokenizer, self.run.batch, self.obj.group
        cand = self.candidates(step)
        prompts = [self.tasks.prompts[i] for i in cand for _ in range(G)]
        key = jax.random.fold_in(jax.random.key(self.run.seed), step)
        new = sample(self.cfg, params, tok, prompts, max_new_tokens=o.max_new_tokens,
                     temperature=o.sample_temperature, seed=key, mesh=self.mesh,
                     rules=self.run.rules)
        rewards = np.array([reward(tok, ids, self.tasks.answers[i])
                            for i, ids in zip(np.repeat(cand, G), new)]).reshape(-1, G)
        self.record(cand, rewards)
        kept, has_signal = select_groups(rewards, B)
        docs = []  # each kept sample: its prompt, then its completion as the only targets
        for m in (k * G + j for k in kept for j in range(G)):
            done, _ = completion(new[m], set(tok.stop_ids))
            docs.append(Document(np.asarray(prompts[m] + done, np.int32), np.r_[
                np.zeros(len(prompts[m])), np.ones(len(done))].astype(np.float32)))
        tokens, weights, real = pad_rows(docs, self.run.seq, self.cfg.text.pad_token_id or 0)
        adv = np.where(has_signal[:, None], group_advantages(rewards[kept]), 0.0)
        score = lambda c, p: score_tokens(c, p, tokens, B * G, self.mesh, self.run.rules)  # noqa: E731
        return {"tokens": tokens, "weights": weights, "real": real,
                "advantages": adv.reshape(-1).astype(np.float32),
                "sample_mask": np.repeat(has_signal, G).astype(np.float32),
                "old_logp": score(self.cfg, params), "ref_logp": score(*o.reference),
                "sampled_rewards": rewards.reshape(-1).astype(np.float32),
                "reward_std": np.float32(rewards[kept[has_signal]].std(-1).mean()
                                         if has_signal.any() else 0.0)}
