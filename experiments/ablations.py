"""The ablations: each a named set of variants of one base config, trained identically (same data
in the same order, same token budget, same optimiser, the same seeds), then evaluated alike.

A variant is a diff of the base, applied with `dataclasses.replace`: `text` (TextConfig fields)
and `optim` (OptimConfig fields), each a dict or a function of the base returning one (for a
value that scales with the size: a chunk of a quarter of the training length). The first variant
is the reference, Llama 4's choice; the others are compared with it. To add an ablation, add an
entry to ABLATIONS, e.g.

    ABLATIONS["no_aux_loss"] = Ablation(
        "no_aux_loss", "What does the load-balancing loss buy?",
        (Variant("llama4"), Variant("no_aux", text=dict(router_aux_loss_coef=0.0))),
        metrics=("bpb", "entropy", "dead", "tok_s"), plots=("train_loss",))

and run `python -m experiments.ablate no_aux_loss`. `metrics` name columns of the results table
(experiments/ablation_report.py: METRICS); `plots` the panels of its figure.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Union

from model.config import Config, TextConfig, every
from training import OptimConfig

Diff = Union[dict, Callable[..., dict]]


@dataclass(frozen=True)
class Variant:
    name: str
    text: Diff = field(default_factory=dict)   # TextConfig fields, or base TextConfig -> fields
    optim: Diff = field(default_factory=dict)  # OptimConfig fields, or base OptimConfig -> fields

    def config(self, base: Config) -> Config:
        diff = self.text(base.text) if callable(self.text) else self.text
        return base.replace_text(**diff)

    def optim_config(self, base: OptimConfig) -> OptimConfig:
        diff = self.optim(base) if callable(self.optim) else self.optim
        return dataclasses.replace(base, **diff)


@dataclass(frozen=True)
class Ablation:
    name: str
    question: str
    variants: tuple[Variant, ...]             # the first is the reference (Llama 4's choice)
    metrics: tuple[str, ...]                  # columns of the table
    plots: tuple[str, ...]                    # panels of the figure
    retrieval: bool = False                   # the passkey task mixed into the training data

    @property
    def evals(self) -> tuple[str, ...]:
        """The evaluations (experiments/evals.py) that its metrics read."""
        from .ablation_report import METRICS
        return tuple(sorted({METRICS[m].source for m in self.metrics} - {"history", "config"}))


@dataclass(frozen=True)
class Size:
    """A base model and what every run of it does: the same for every variant and seed."""
    name: str
    text: dict                    # TextConfig fields of the base model (bytes: vocabulary 263)
    seq: int                      # T, the training length
    batch: int
    steps: int
    optim: dict                   # OptimConfig fields (steps comes from `steps`)
    files: int | None             # training files of the standard library (None: all)
    retrieval_fraction: float     # of the training rows, where an ablation mixes the task in
    eval_rows: int                # held-out rows of T tokens
    long_rows: int                # held-out rows of 16 T tokens
    per_depth: int                # passkey examples per evaluation length and depth
    eval_batch: int
    save_every: int
    # Where compiling costs more than running: retrieval at one (padded) length, so that one
    # compiled forward serves it and the positions; XLA without LLVM's optimisations and without
    # its fusion emitters (for a few steps only: the code runs more slowly, but the smoke model's
    # train step compiles in 3 CPU-seconds instead of 8.4 with LLVM's optimisations off alone).
    one_length_retrieval: bool = False
    xla_flags: str = ""

    def optim_config(self, steps: int | None = None) -> OptimConfig:
        return OptimConfig(steps=steps or self.steps, **self.optim)


# The default base model: the quickstart's Llama 4 at half the width, every feature on (MoE with
# a shared expert in every layer, three chunked-RoPE layers with QK norm, one global NoPE layer
# with temperature tuning). Sized so that an ablation (four variants x three seeds) costs 5 to
# 8 CPU-minutes, on one core of the 2-core machine (README, Ablations). Chunk and floor scale are
# T / 4, as Llama 4's 8192 sits below its training length, so that both act inside the training
# length and past it.
_BASE = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
             intermediate_size=128, intermediate_size_mlp=256, num_experts=4,
             experts_per_token=1, moe_layers=(0, 1, 2, 3), nope_layers=(3,),
             attention_chunk_size=16, rope_theta=10000.0, rope_scaling=None, use_qk_norm=True,
             attn_temperature_tuning=True, floor_scale=16.0, attn_scale=0.1,
             max_position_embeddings=4096, router_aux_loss_coef=0.01)

SIZES = {
    "default": Size("default", _BASE, seq=64, batch=8, steps=150,
                    optim=dict(lr=3e-3, warmup=15, min_lr_ratio=0.1, weight_decay=0.1, clip=1.0),
                    files=None, retrieval_fraction=0.25, eval_rows=64, long_rows=8,
                    per_depth=1, eval_batch=8, save_every=50, one_length_retrieval=True),
    # Every ablation end to end in seconds (the test suite runs it): two layers, a few steps.
    "smoke": Size("smoke", dict(_BASE, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=16, intermediate_size_mlp=32,
                                moe_layers=(0, 1), nope_layers=(1,), attention_chunk_size=8,
                                floor_scale=8.0, max_position_embeddings=1024),
                  seq=32, batch=4, steps=6,
                  optim=dict(lr=1e-2, warmup=1, min_lr_ratio=0.1, weight_decay=0.1, clip=1.0),
                  files=6, retrieval_fraction=0.25, eval_rows=4, long_rows=2, per_depth=1,
                  eval_batch=4, save_every=3, one_length_retrieval=True,
                  xla_flags="--xla_backend_optimization_level=0 "
                            "--xla_cpu_use_fusion_emitters=false"),
}


def base_config(size: Size, tok) -> Config:
    text = TextConfig(vocab_size=tok.vocab_size, bos_token_id=tok.special["bos"],
                      eos_token_ids=tuple(tok.stop_ids), pad_token_id=tok.special["pad"],
                      **size.text)
    return Config(text=text, vision=None, dtype="float32")


def _all(t: TextConfig) -> tuple[int, ...]:
    return tuple(range(t.num_layers))


# Metric groups (columns) shared by several ablations.
_LENGTH = ("bpb", "bpb_1x", "bpb_2x", "bpb_4x", "bpb_8x", "bpb_16x", "rise_16x",
           "passkey_1x", "passkey_2x", "passkey_4x", "passkey_16x")
_MOE = ("bpb", "train_bpb", "entropy", "dead", "max_load", "tok_s", "active", "total")

ABLATIONS = {a.name: a for a in (
    Ablation(
        "irope", "Does Llama 4's iRoPE (chunked RoPE layers, a global NoPE layer every 4th) hold "
        "its loss and retrieval past the training length, where all-RoPE full attention does not?",
        (Variant("llama4"),
         Variant("all_rope", text=dict(nope_layers=(), attention_chunk_size=None)),
         Variant("all_nope", text=lambda t: dict(nope_layers=_all(t))),
         Variant("chunked_only", text=dict(nope_layers=()))),
        metrics=_LENGTH, plots=("positions", "retrieval"), retrieval=True),
    Ablation(
        "temperature", "What does temperature tuning of the NoPE layers' queries change past the "
        "floor scale (here T / 4), and past the training length (floor scale T)?",
        (Variant("llama4"),
         Variant("off", text=dict(attn_temperature_tuning=False)),
         Variant("floor_T", text=lambda t: dict(floor_scale=4.0 * t.floor_scale))),
        metrics=_LENGTH, plots=("positions", "retrieval"), retrieval=True),
    Ablation(
        "chunk", "How does the chunk of the RoPE layers (at a fixed training length T) change "
        "loss and retrieval at and past T?",
        (Variant("chunk_T/4"),
         Variant("chunk_T/8", text=lambda t: dict(attention_chunk_size=t.attention_chunk_size // 2)),
         Variant("chunk_T/2", text=lambda t: dict(attention_chunk_size=t.attention_chunk_size * 2)),
         Variant("chunk_T", text=lambda t: dict(attention_chunk_size=t.attention_chunk_size * 4))),
        metrics=_LENGTH, plots=("positions", "retrieval"), retrieval=True),
    Ablation(
        "moe", "At equal compute per token: top-1 + shared expert (Llama 4) against a dense FFN, "
        "top-2 without a shared expert (Mixtral-like) and 4x the experts.",
        (Variant("llama4"),
         Variant("dense", text=lambda t: dict(moe_layers=(),
                                             intermediate_size_mlp=2 * t.intermediate_size)),
         Variant("top2_no_shared", text=dict(experts_per_token=2, shared_expert=False)),
         Variant("4x_experts", text=lambda t: dict(num_experts=4 * t.num_experts))),
        metrics=_MOE, plots=("train_loss",)),
    Ablation(
        "router", "The router score: a sigmoid on the expert's input (Llama 4), on its output, "
        "or a softmax over the experts (on the input, on the output).",
        (Variant("llama4"),
         Variant("score_on_output", text=dict(router_score="output")),
         Variant("softmax", text=dict(router_activation="softmax")),
         Variant("softmax_on_output", text=dict(router_activation="softmax",
                                                router_score="output"))),
        metrics=("bpb", "train_bpb", "entropy", "dead", "max_load", "spikes", "max_grad"),
        plots=("train_loss",)),
    Ablation(
        "qk_norm", "QK norm (RoPE layers) on and off, at the base learning rate and at 4x it.",
        (Variant("llama4"),
         Variant("off", text=dict(use_qk_norm=False)),
         Variant("on_lr_x4", optim=lambda o: dict(lr=4 * o.lr)),
         Variant("off_lr_x4", text=dict(use_qk_norm=False), optim=lambda o: dict(lr=4 * o.lr))),
        metrics=("bpb", "train_bpb", "spikes", "max_grad", "diverged"),
        plots=("train_loss", "grad_norm")),
    Ablation(
        "interleave", "MoE in every layer (Scout) or in every other layer with dense FFNs of equal "
        "active size between (Maverick).",
        (Variant("every_layer"),
         Variant("every_other", text=lambda t: dict(moe_layers=every(2, t.num_layers, 1),
                                                   intermediate_size_mlp=2 * t.intermediate_size))),
        metrics=_MOE, plots=("train_loss",)),
)}
