"""The command-line flags of each post-training objective of `experiments.train` (--objective),
and the objective they build (training.objectives). Flags default to None here, so that one
given to the wrong objective is an error rather than silently unused; the defaults applied are
the objective classes' own (`--help` shows them).
"""
from __future__ import annotations

import argparse

NAMES = ("sft", "dpo", "distill", "grpo")   # training.objectives.NAMES, without importing JAX

# flag dest -> (objective, help). Each dest is a field of that objective's class.
FLAGS = {
    "beta": ("dpo", "DPO's beta: the implicit reward's scale (default 0.1)"),
    "teacher": ("distill", "the teacher checkpoint (HF dir, Orbax dir or a run dir)"),
    "distill_rule": ("distill", "how the soft-target weight is set: fixed | gradnorm | "
                                "confidence (default gradnorm; training/distill.py)"),
    "soft_weight": ("distill", "the fixed rule's soft-target weight in [0, 1] (default 0.5)"),
    "distill_temperature": ("distill", "temperature of the soft targets (default 2)"),
    "group": ("grpo", "samples per prompt (default 8)"),
    "kl_coef": ("grpo", "weight of the KL penalty to the reference (default 0.04)"),
    "clip_ratio": ("grpo", "the ratio's clip epsilon (default 0.2)"),
    "updates_per_rollout": ("grpo", "optimizer steps per sampled rollout (default 1)"),
    "max_new_tokens": ("grpo", "tokens sampled per completion (default 16)"),
    "sample_temperature": ("grpo", "sampling temperature of the rollouts (default 1)"),
    "oversample": ("grpo", "candidate prompts sampled per batch slot (default 2)"),
    "sampling": ("grpo", "how prompts are drawn: difficulty | uniform (default difficulty)"),
    "pass_rate_decay": ("grpo", "decay of a prompt's running pass rate per visit (default 0.5)"),
}
TYPES = {"beta": float, "soft_weight": float, "distill_temperature": float, "group": int,
         "kl_coef": float, "clip_ratio": float, "updates_per_rollout": int,
         "max_new_tokens": int, "sample_temperature": float, "oversample": int,
         "pass_rate_decay": float}


def add_arguments(ap: argparse.ArgumentParser):
    ap.add_argument("--objective", default="sft", choices=NAMES,
                    help="what to train: sft (next-token loss), dpo (preference pairs), distill "
                         "(from --teacher), grpo (online RL on verifiable tasks); the README "
                         "gives each one's data format")
    ap.add_argument("--ref", help="dpo, grpo: the frozen reference (default: --init)")
    for objective in NAMES[1:]:
        group = ap.add_argument_group(f"--objective {objective}")
        for dest, (owner, text) in FLAGS.items():
            if owner == objective:
                group.add_argument("--" + dest.replace("_", "-"), dest=dest,
                                   type=TYPES.get(dest, str), help=text)


def check(args):
    """The objective's flags, before anything is read: a flag of another objective than the
    chosen one is an error naming it, and so is a setting out of range."""
    from training import SettingsError
    given = [d for d, (owner, _) in FLAGS.items()
             if getattr(args, d) is not None and owner != args.objective]
    if args.ref is not None and args.objective not in ("dpo", "grpo"):
        given.append("ref")
    if given:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        raise SettingsError(f"{flags}: not a setting of --objective {args.objective}")
    if args.objective == "distill" and args.teacher is None:
        raise SettingsError("--objective distill needs --teacher CKPT")
    if args.objective in ("dpo", "grpo") and args.init is None:
        raise SettingsError(f"--objective {args.objective} needs --init CKPT (the policy to "
                            "start from; by default also its frozen reference)")
    if args.objective != "sft":
        _construct(args, None, None)


def _frozen_field(args) -> str:
    return "teacher" if args.objective == "distill" else "reference"


def _construct(args, frozen, tok, **more):
    """The objective with the given flags (its class checks them); `frozen`: (cfg, params)."""
    from training.objectives import OBJECTIVES
    extra = {"tokenizer": tok} if args.objective == "grpo" else {}
    return OBJECTIVES[args.objective](**{_frozen_field(args): frozen}, **extra, **settings(args),
                                      **more)


def settings(args) -> dict:
    """The chosen objective's flags that were given, by field name."""
    return {d: getattr(args, d) for d, (owner, _) in FLAGS.items()
            if owner == args.objective and getattr(args, d) is not None and d != "teacher"}


def build(args, cfg, init_params, tok, load):
    """The objective of `args` for the policy (cfg, init_params) (its settings passed `check`);
    `load(path)` -> (cfg, params) reads the reference or teacher."""
    from training.objectives import SFT
    if args.objective == "sft":
        return SFT()
    path = args.teacher if args.objective == "distill" else (args.ref or args.init)
    other = (cfg, init_params) if path == args.init else load(path)
    check_vocabulary(cfg, tok, other[0], path, _frozen_field(args))
    return _construct(args, other, tok, **{f"{_frozen_field(args)}_path": path})


def check_vocabulary(cfg, tok, other_cfg, path: str, role: str):
    """The other model must score the policy's tokens: the same vocabulary, and the same
    tokenizer where its checkpoint has a tokenizer.json."""
    import os
    from model.config import ConfigError
    from training import load_tokenizer
    if other_cfg.text.vocab_size != cfg.text.vocab_size:
        raise ConfigError(f"the {role} {path} has a vocabulary of {other_cfg.text.vocab_size} "
                          f"tokens, the model trained {cfg.text.vocab_size}: they must share one "
                          "tokenizer (its distributions are compared token by token)")
    own = os.path.join(path, "tokenizer.json")
    if os.path.isfile(own) and load_tokenizer(own).tk.get_vocab() != tok.tk.get_vocab():
        raise ConfigError(f"the {role}'s tokenizer ({own}) differs from the one this run uses: "
                          "the same ids must mean the same tokens")
