"""The results of `experiments.post_train`: a table per stage (mean ± sample standard deviation
over seeds), findings by the ablations' rule (two figures differ only when their means are
further apart than the sum of their seed spreads), and the per-stage curves with seed bands."""
from __future__ import annotations

import datetime
import os
import platform

import numpy as np

from experiments.ablation_report import Stat, _band, _ema, compare, stat


STAGES = ("sft", "grpo", "dpo", "student_hard", "student_distill")


def _seeds(records: dict, stage: str, seeds: int) -> list[dict]:
    """The stage's records of the seeds that ran it (all, unless the run was cut short)."""
    return [records[k] for k in (f"{stage}/{s}" for s in range(seeds)) if k in records]


def _tail(values: list, n: int = 10) -> float:
    return float(np.mean(values[-n:]))


def _head(values: list, n: int = 10) -> float:
    return float(np.mean(values[:n]))


def _row(label: str, *cells: Stat, fmt: str = ".3f") -> str:
    return f"| {label} | " + " | ".join(c.text(fmt) for c in cells) + " |"


def _finding(what: str, before: Stat, after: Stat, fmt: str = ".3f", lower_better=False) -> str:
    d = compare(after, before)
    change = f"{before.text(fmt)} -> {after.text(fmt)}"
    if d is None:
        verdict = "one side has a single run: no spread to judge by"
    elif d == 0.0:
        verdict = (f"a change of {after.mean - before.mean:+{fmt}}, inside the seed spreads: "
                   "no difference")
    else:
        better = (d < 0) == lower_better
        verdict = f"{'better' if better else 'worse'} by {abs(d):{fmt}}, beyond the seed spreads"
    return f"- {what}: {change}; {verdict}."


def _against_fixed(what: str, ref: str, value: float, s: Stat) -> str:
    """Against a figure no seed enters (chance, or the one base model): `s` counts when its
    mean is further from it than its own seed spread, and more than one seed ran."""
    if s.n < 2:
        verdict = "a single run: no spread to judge by"
    elif abs(s.mean - value) > s.sd:
        verdict = (f"{'above' if s.mean > value else 'below'} {ref} ({value:.3f}) beyond the "
                   "seed spread")
    else:
        verdict = f"within the seed spread of {ref} ({value:.3f}): no difference"
    return f"- {what}: {s.text('.3f')}; {verdict}."


def tables(records: dict, seeds: int) -> tuple[str, list[str]]:
    """(the markdown tables, the findings)."""
    S = lambda stage, get: stat(get(r) for r in _seeds(records, stage, seeds))  # noqa: E731
    one = lambda v: stat([v])  # noqa: E731
    base, filt, data = records["base_eval"], records["filter"], records["data"]
    sft_s, sft_g = S("sft", lambda r: r["pass_sampled"]), S("sft", lambda r: r["pass_greedy"])
    grpo_s, grpo_g = S("grpo", lambda r: r["pass_sampled"]), S("grpo", lambda r: r["pass_greedy"])
    dpo_s, dpo_g = S("dpo", lambda r: r["pass_sampled"]), S("dpo", lambda r: r["pass_greedy"])
    roll_first = S("grpo", lambda r: _head(r["pass_rate"]))
    roll_last = S("grpo", lambda r: _tail(r["pass_rate"]))
    held_acc = S("dpo", lambda r: r["held_reward_accuracy"])
    hard = S("student_hard", lambda r: r["held_bits"])
    taught = S("student_distill", lambda r: r["held_bits"])
    out = []
    if "base" in records:
        b = records["base"]
        out += [f"Base: the quickstart's model after {b['steps']} steps: "
                f"{b['final_train_bits_per_byte']:.3f} bits/byte (train, last 10 steps), "
                f"{b['held_out_bits_per_byte']:.3f} on held-out files.", ""]
    out += ["### Easy-data filtering (the base as judge, one run: no seed enters)", "",
            "| | kept | dropped |", "|---|---|---|",
            f"| records | {filt['kept']} | {filt['dropped']} |",
            f"| judge's mean loss (nats/token) | {filt['loss_kept']:.3f} | "
            f"{filt['loss_dropped']:.3f} |",
            f"| share answered with the reversal | {filt['correct_kept']:.3f} | "
            f"{filt['correct_dropped']:.3f} |", "",
            f"(All {data['sft_records']} records: {data['sft_correct']:.3f} reversed.)", "",
            "### Held-out pass rate through the stages", "",
            f"{data['held_out_tasks']} held-out tasks; sampled: temperature 1; greedy: "
            "temperature 0.", "",
            "| after | sampled | greedy |", "|---|---|---|",
            _row("base (one run)", one(base["pass_sampled"]), one(base["pass_greedy"])),
            _row("SFT", sft_s, sft_g), _row("GRPO", grpo_s, grpo_g), _row("DPO", dpo_s, dpo_g),
            "", "### GRPO", "",
            "| | first 10 steps | last 10 steps |", "|---|---|---|",
            _row("rollouts' pass rate (training tasks)", roll_first, roll_last),
            _row("KL to the reference", S("grpo", lambda r: _head(r["kl"])),
                 S("grpo", lambda r: _tail(r["kl"])), fmt=".4f"),
            _row("groups kept per batch slot", S("grpo", lambda r: _head(r["groups_kept"])),
                 S("grpo", lambda r: _tail(r["groups_kept"]))),
            "", "### DPO (reference: the seed's GRPO model)", "",
            "| | value |", "|---|---|",
            _row("held-out reward accuracy", held_acc),
            _row("train reward accuracy, last 10 steps",
                 S("dpo", lambda r: _tail(r["reward_accuracy"]))),
            _row("train loss, first step", S("dpo", lambda r: r["dpo"][0])),
            _row("train loss, last 10 steps", S("dpo", lambda r: _tail(r["dpo"]))),
            _row("chosen log-prob (policy, mean), first step",
                 S("dpo", lambda r: r.get("chosen_logp", [None])[0])),
            _row("chosen log-prob, last 10 steps",
                 S("dpo", lambda r: _tail(r["chosen_logp"]) if "chosen_logp" in r else None)),
            _row("rejected log-prob, last 10 steps",
                 S("dpo", lambda r: _tail(r["rejected_logp"]) if "rejected_logp" in r else None)),
            "", "### Distillation (held-out stdlib files, bits/byte)", "",
            "| | bits/byte |", "|---|---|",
            _row("teacher (the base, one run)", one(records["teacher"]["held_bits"])),
            _row("student, hard targets only", hard),
            _row("student, distilled (gradnorm rule)", taught)]
    findings = [
        _against_fixed("SFT, held-out pass rate (greedy)", "the base's",
                       base["pass_greedy"], sft_g),
        _finding("GRPO, held-out pass rate (sampled), SFT -> GRPO", sft_s, grpo_s),
        _finding("GRPO, held-out pass rate (greedy), SFT -> GRPO", sft_g, grpo_g),
        _finding("GRPO, the rollouts' pass rate, first 10 -> last 10 steps", roll_first,
                 roll_last),
        _finding("DPO, held-out pass rate (greedy), GRPO -> DPO", grpo_g, dpo_g),
        _against_fixed("DPO, held-out reward accuracy", "chance", 0.5, held_acc),
        _finding("Distillation, student's held-out bits/byte, hard only -> distilled", hard,
                 taught, lower_better=True),
    ]
    return "\n".join(out), findings


def figure(records: dict, seeds: int, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "SFT: train loss (nats/token)", [("sft", "ce", "SFT", "C0")]),
        (axes[0, 1], "GRPO: rollouts' pass rate (training tasks)",
         [("grpo", "pass_rate", "GRPO", "C1")]),
        (axes[1, 0], "DPO: train reward accuracy", [("dpo", "reward_accuracy", "DPO", "C2")]),
        (axes[1, 1], "Student: train loss (nats/token)",
         [("student_hard", "ce", "hard targets only", "C3"),
          ("student_distill", "ce", "distilled", "C4")]),
    ]
    for ax, title, curves in panels:
        for stage, key, label, color in curves:
            runs = [_ema(r[key]) for r in _seeds(records, stage, seeds)]
            if not runs:
                continue
            _band(ax, np.arange(1, len(runs[0]) + 1), runs, label, color)
        ax.set(title=title, xlabel="step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"Post-training stages: mean over {seeds} seeds (EMA 0.9), band ±1 sd")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ran(records: dict, seeds: int) -> str:
    done = {st: len(_seeds(records, st, seeds)) for st in STAGES}
    if all(n == seeds for n in done.values()):
        return ""
    return ("; the run was cut short, seeds done: "
            + ", ".join(f"{st} {n}" for st, n in done.items()))


def write(records: dict, seeds: int, size, cmd: str, results: str):
    os.makedirs(results, exist_ok=True)
    figure(records, seeds, os.path.join(results, "post_training.png"))
    body, findings = tables(records, seeds)
    total = sum(r.get("wall_s", 0) for r in records.values())
    st = size.stage
    lines = [
        "# Post-training, end to end", "", f"    {cmd}", "",
        f"Made {datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPU cores "
        f"(shared), fp32; {total / 60:.1f} min over all stages. Seeds: "
        f"{seeds} per stage (the base and the filter are one run each){_ran(records, seeds)}. "
        "Curves: post_training.png.", "",
        f"Task: reverse {size.digits} letters of a-h, chat form; "
        f"{records['data']['train_tasks']} training tasks, "
        f"{records['data']['held_out_tasks']} held out. Steps: SFT {st['sft']['steps']} (lr "
        f"{st['sft']['lr']}), GRPO {st['grpo']['steps']} (lr {st['grpo']['lr']}, group "
        f"{st['grpo']['group']}, {st['grpo']['batch']} prompts a step), DPO "
        f"{st['dpo']['steps']} (lr {st['dpo']['lr']}, beta {st['dpo']['beta']}), student "
        f"{st['distill']['steps']} (lr {st['distill']['lr']}).", "",
        body, "", "## Findings", "",
        "Two figures differ only when their means are further apart than the sum of their "
        "seed spreads (sample standard deviations); closer is no difference.", "",
        *findings, ""]
    with open(os.path.join(results, "post_training.md"), "w") as f:
        f.write("\n".join(lines))

