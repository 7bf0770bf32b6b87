"""An ablation's results: metrics per run, mean and spread over seeds, the table, the findings and
the figure (experiments/ablate.py writes them to experiments/results/ablations/NAME.md, .png).

The rule for a finding: a variant differs from the reference on a metric only where the two
means are further apart than the sum of their seed spreads (sample standard deviations over the
seeds); anything closer is reported as no difference.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .evals import MULTIPLES


@dataclass(frozen=True)
class Metric:
    label: str
    source: str                       # the evaluation it reads, or "history" / "config"
    get: Callable[[dict], float | None]
    better: int                       # +1 higher is better, -1 lower, 0 neither
    fmt: str = ".3f"


def _at(*keys):
    def get(r):
        for k in keys:
            if not isinstance(r, dict) or k not in r:
                return None
            r = r[k]
        return r
    return get


def _train_bpb(r):
    h = r.get("history") or []
    return statistics.mean(m["ce"] for m in h[-10:]) / math.log(2) if h else None


def _rise(r):
    p = r.get("positions")
    return None if p is None else p["16x"] - p["1x"]


METRICS = {
    "bpb": Metric("held-out bpb", "heldout", _at("heldout", "bits_per_byte"), -1),
    "train_bpb": Metric("train bpb (last 10 steps)", "history", _train_bpb, -1),
    **{f"bpb_{m}x": Metric(f"bpb at {m}x", "positions", _at("positions", f"{m}x"), -1)
       for m in MULTIPLES},
    "rise_16x": Metric("bpb 16x - 1x", "positions", _rise, -1),
    **{f"passkey_{m}x": Metric(f"passkey at {m}x", "retrieval", _at("retrieval", f"{m}x"), 1, ".2f")
       for m in MULTIPLES},
    "entropy": Metric("load-balance entropy", "heldout", _at("heldout", "balance_entropy"), 1),
    "dead": Metric("dead experts", "heldout", _at("heldout", "dead_experts"), -1, ".1f"),
    "max_load": Metric("max expert load (x fair)", "heldout", _at("heldout", "max_load"), -1, ".2f"),
    "spikes": Metric("loss spikes", "history", _at("stability", "loss_spikes"), -1, ".1f"),
    "max_grad": Metric("max grad norm", "history", _at("stability", "max_grad_norm"), -1, ".2f"),
    "diverged": Metric("diverged", "history", lambda r: float("diverged_at" in r), -1, ".2f"),
    "tok_s": Metric("train tokens/s", "history", _at("tokens_per_s"), 0, ",.0f"),
    "active": Metric("active params", "config", _at("params_active"), 0, "M"),
    "total": Metric("total params", "config", _at("params_total"), 0, "M"),
}


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float          # sample standard deviation over the seeds (0 with one seed)
    n: int

    def text(self, fmt: str) -> str:
        if self.n == 0:
            return "—"
        if fmt == "M":
            return f"{self.mean / 1e6:.3f}M"
        spread = f" ± {self.sd:{fmt.lstrip('+')}}" if self.n > 1 else ""
        return f"{self.mean:{fmt}}{spread}"


def stat(values) -> Stat:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))


def summarize(ablation, runs: dict[str, list[dict]]) -> dict[str, dict[str, Stat]]:
    """runs: variant -> each seed's record -> {variant: {metric: Stat}}."""
    return {v.name: {m: stat(METRICS[m].get(r) for r in runs[v.name]) for m in ablation.metrics}
            for v in ablation.variants}


def table(ablation, stats) -> str:
    cols = ablation.metrics
    ref = ablation.variants[0].name
    lines = ["| variant | " + " | ".join(METRICS[m].label for m in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for v in ablation.variants:
        name = f"{v.name} (reference)" if v.name == ref else v.name
        lines.append(f"| {name} | " + " | ".join(stats[v.name][m].text(METRICS[m].fmt)
                                                  for m in cols) + " |")
    return "\n".join(lines)


def compare(a: Stat, ref: Stat) -> float | None:
    """The difference a - ref where it exceeds both seed spreads together; 0.0 where it does
    not; None where either side has fewer than two seeds (no spread to judge by)."""
    if a.n < 2 or ref.n < 2:
        return None
    d = a.mean - ref.mean
    return d if abs(d) > a.sd + ref.sd else 0.0


def findings(ablation, stats) -> list[str]:
    ref = ablation.variants[0].name
    out = []
    for v in ablation.variants[1:]:
        diff, same, unjudged = [], [], []
        for m in ablation.metrics:
            met = METRICS[m]
            if met.better == 0 or stats[v.name][m].n == 0 or stats[ref][m].n == 0:
                continue  # not judged, or not measured on one side (a dense FFN has no experts)
            d = compare(stats[v.name][m], stats[ref][m])
            if d is None:
                unjudged.append(met.label)
            elif d == 0.0:
                same.append(met.label)
            else:
                word = "better" if d * met.better > 0 else "worse"
                diff.append(f"{met.label} {d:+{met.fmt}} ({word})")
        line = f"- **{v.name}** against {ref}: " + ("; ".join(diff) if diff else
                                                     "no difference beyond the seed spread")
        if same and diff:
            line += f"; no difference in {', '.join(same)}"
        if unjudged:
            line += f"; not judged (fewer than two seeds): {', '.join(unjudged)}"
        out.append(line)
    return out


def length_findings(ablation, stats) -> list[str]:
    """Whether each variant holds its loss out to 16x the training length: the rise of bpb from
    1x to 16x within its seed spread (or a fall) holds; a larger rise does not."""
    if "rise_16x" not in ablation.metrics:
        return []
    out = []
    for v in ablation.variants:
        s = stats[v.name]["rise_16x"]
        if s.n == 0:
            continue
        holds = s.mean <= s.sd if s.n > 1 else s.mean <= 0
        out.append(f"- {v.name}: bpb {s.text('+.3f')} from 1x to 16x: "
                   + ("holds its loss" if holds else "does not hold its loss")
                   + f" (1x {stats[v.name]['bpb_1x'].text('.3f')}, "
                     f"16x {stats[v.name]['bpb_16x'].text('.3f')})")
    return out


# ---- the figure ----------------------------------------------------------------------------------

def _band(ax, x, curves, label, color):
    a = np.asarray(curves, float)
    mean = np.nanmean(a, 0)
    ax.plot(x, mean, label=label, color=color, lw=1.5)
    if len(a) > 1:
        sd = np.nanstd(a, 0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)


def _ema(x, a=0.9):
    out, e = [], x[0]
    for v in x:
        e = a * e + (1 - a) * v
        out.append(e)
    return out


def _panel(ax, kind: str, ablation, runs, seq: int):
    for i, v in enumerate(ablation.variants):
        rs = [r for r in runs[v.name] if kind in ("train_loss", "grad_norm") or kind in r]
        if not rs:
            continue
        c = f"C{i}"
        if kind == "positions":
            w = rs[0]["positions"]["curve_window"]
            x = (np.arange(len(rs[0]["positions"]["curve"])) + 0.5) * w
            _band(ax, x, [r["positions"]["curve"] for r in rs], v.name, c)
        elif kind == "retrieval":
            _band(ax, MULTIPLES, [[r["retrieval"][f"{m}x"] for m in MULTIPLES] for r in rs],
                  v.name, c)
        else:
            key = "ce" if kind == "train_loss" else "grad_norm"
            n = min(len(r["history"]) for r in rs)
            scale = 1 / math.log(2) if key == "ce" else 1
            _band(ax, np.arange(1, n + 1),
                  [_ema([m[key] * scale for m in r["history"][:n]]) for r in rs], v.name, c)
    if kind == "positions":
        ax.axvline(seq, color="gray", ls=":", lw=1)
        ax.set(xscale="log", xlabel=f"position (training length T = {seq}: dotted)",
               ylabel="held-out bits per byte", title="loss by position (mean ± sd over seeds)")
    elif kind == "retrieval":
        ax.set(xscale="log", xticks=MULTIPLES, xticklabels=[f"{m}x" for m in MULTIPLES],
               ylim=(-0.05, 1.05), xlabel="context length (x T)", ylabel="passkey accuracy",
               title="passkey retrieval (all depths)")
    elif kind == "train_loss":
        ax.set(xlabel="step", ylabel="train bits per byte (EMA 0.9)", title="training loss")
    else:
        ax.set(xlabel="step", ylabel="gradient norm (EMA 0.9)", yscale="log",
               title="gradient norm (before clipping)")
    ax.legend(fontsize=8)


def figure(ablation, runs: dict[str, list[dict]], seq: int, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(ablation.plots)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), squeeze=False)
    for ax, kind in zip(axes[0], ablation.plots):
        _panel(ax, kind, ablation, runs, seq)
    fig.suptitle(f"ablation: {ablation.name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the results file ------------------------------------------------------------------------

def _setup(context) -> str:
    s, t = context["size"], context["base"]
    tokens = context["steps"] * s.batch * s.seq
    o = s.optim
    moe = (f"MoE in layers {list(t.moe_layers)} ({t.num_experts} experts, top-{t.experts_per_token}"
           f", F={t.intermediate_size}, shared expert F={t.intermediate_size})")
    return (f"Base model (the reference; variants change it as listed by `python -m "
            f"experiments.ablate --list`): D={t.hidden_size}, {t.num_layers} layers, {t.num_heads} "
            f"heads ({t.num_kv_heads} KV) of {t.head_dim}, {moe}, NoPE layers "
            f"{list(t.nope_layers)}, chunk {t.attention_chunk_size}, QK norm "
            f"{'on' if t.use_qk_norm else 'off'}, temperature tuning floor scale "
            f"{t.floor_scale:g}, byte vocabulary ({t.vocab_size}), fp32.\n"
            f"Training (every variant and seed alike): {context['steps']} steps x {s.batch} rows "
            f"x T = {s.seq} bytes = {tokens:,} tokens, AdamW lr {o['lr']:g} (warmup "
            f"{o['warmup']}, cosine to {o['min_lr_ratio']:g}x), weight decay {o['weight_decay']:g},"
            f" clip {o['clip']:g}, router aux-loss coefficient {t.router_aux_loss_coef:g}; data: "
            f"the standard library's top-level sources ({'all' if s.files is None else s.files} "
            f"files but every 20th), in the order of the seed; {context['seeds']} seeds "
            f"(0..{context['seeds'] - 1}: initialisation and data order).\n"
            f"Evaluation on the held-out files (every 20th): {s.eval_rows} rows of T, "
            f"{s.long_rows} rows of 16 T, {s.per_depth} passkey examples per length and depth.")


def markdown(ablation, stats, context) -> str:
    load = context["load"]
    load = f"load average {load[0]:.1f}-{load[1]:.1f}" if load else "load not recorded"
    lines = [
        f"# Ablation `{ablation.name}`", "", ablation.question, "",
        f"Made by `{context['command']}` (code {context['code']}).", "",
        _setup(context), "",
        f"Time: {context['cpu_minutes']:.1f} CPU-minutes of training and evaluation over its "
        f"runs, compilation included ({context['minutes']:.1f} min wall-clock, on one core of "
        f"the 2-core machine shared with other work: {load} at the runs' starts); a run shared "
        "with another ablation counts in both.", "",
        "Mean ± sample standard deviation over the seeds. bpb: bits per byte. \"Nx\": "
        "positions [N T / 2, N T) of held-out rows of 16 T; passkey: exact-match accuracy of "
        "the 5-digit key at context N T, all depths."
        + (" Passkey rows are a quarter of the training rows." if ablation.retrieval else ""),
        "", table(ablation, stats), "",
        "## Findings", "",
        "Generated from the table: a variant differs from the reference on a metric only where "
        "their means are further apart than the sum of their seed spreads; closer is no "
        "difference. Tokens per second and parameter counts are not judged (the machine's load "
        "moves the first; the second is by design).", "",
        *findings(ablation, stats)]
    held = length_findings(ablation, stats)
    if held:
        lines += ["", "Length generalisation (bpb at 16x minus 1x; holds when the rise is "
                  "within its seed spread or a fall):", "", *held]
    lines += ["", "Scale: a model of this size trained for minutes on one CPU; a difference "
              "here says what these settings do at this scale, not what they do in Llama 4.", ""]
    return "\n".join(lines)
