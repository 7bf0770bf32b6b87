"""Post-training end to end, as Meta describes Llama 4's: a base model -> easy-data filtering ->
SFT -> online RL (GRPO) -> DPO, and the base distilled into a smaller student; every stage's
metrics over seeds in one results file with plots.

    python -m experiments.post_train [--size default|smoke] [--seeds 3] [--base CKPT] [--out DIR]
    python -m experiments.post_train --report     # the results again from OUT's records

Every stage runs the project's own command, in this process: `experiments.quickstart` trains
the base (unless --base names a checkpoint), `experiments.make_tasks` writes the tasks,
`experiments.filter_easy` filters the SFT data with the base as judge, and `experiments.train
--objective sft|grpo|dpo|distill` trains the rest. The task is reversing `digits` letters of
a-h ("reverse abc:" -> "cba"), in chat form; its tasks are split into a training set and a
held-out set that no stage trains on.

- base: the quickstart's model (Python stdlib source, bytes), one run (it is the starting
  point every seed shares, not a result).
- filter: SFT chat records, one per training task, whose answer is the reversal half the time
  and the letters copied unchanged otherwise (a noisy teacher); the judge's loss drops the
  easiest half. The share of reversed answers among the kept and the dropped says what the
  judge's loss picked.
- sft (per seed): the kept records; the seed orders the batches.
- grpo (per seed): from that seed's SFT model, on the training tasks (reward: the exact
  reversal, then a stop token).
- dpo (per seed): from that seed's GRPO model (also its reference), on pairs chosen = the
  reversal, rejected = the copy (palindromes left out: their two sides are equal).
- distill (per seed): a student of 2 layers from scratch on a few stdlib files, taught by the
  base (--objective distill, the gradnorm rule) or on the data's tokens alone (--objective
  sft), same init, data order and steps; scored on the quickstart's held-out files.
Held-out pass rates are sampled at temperature 1 (`eval_samples` per task: what RL optimises)
and greedy. Each stage's record is kept in OUT/records.json, so a killed run continues where
it stopped (the train runs themselves resume from their checkpoints). The results go to
experiments/results/post_training.md and .png (--size smoke: OUT/results/).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from experiments import cli

# JAX and the packages over it are imported once the arguments are parsed.

DEFAULT_RESULTS = os.path.join("experiments", "results")


@dataclass(frozen=True)
class Size:
    base_steps: int               # the quickstart's steps when no --base is given
    tasks: int                    # tasks written; `held_out` of them are never trained on
    held_out: int
    digits: int
    stage: dict                   # stage -> experiments.train flags (steps, batch, seq, lr ...)
    student: dict                 # --set fields of the distilled student
    distill_files: int            # stdlib files the student trains on
    eval_samples: int             # sampled completions per held-out task
    seeds: int = 3


_STUDENT = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=128, intermediate_size_mlp=256, moe_layers=(1,),
                nope_layers=(1,), attention_chunk_size=64, rope_theta=10000.0, rope_scaling=None)

SIZES = {
    "default": Size(
        base_steps=400, tasks=512, held_out=128, digits=3, eval_samples=4,
        stage={"sft": dict(steps=200, batch=16, seq=48, lr=1e-3, warmup=20),
               "grpo": dict(steps=60, batch=8, seq=48, lr=1e-4, warmup=5, group=8,
                            max_new_tokens=4, oversample=3),
               "dpo": dict(steps=40, batch=8, seq=48, lr=3e-4, warmup=4, beta=0.1),
               "distill": dict(steps=150, batch=8, seq=128, lr=3e-3, warmup=15)},
        student=_STUDENT, distill_files=10),
    "smoke": Size(
        base_steps=4, tasks=40, held_out=8, digits=2, eval_samples=1, seeds=2,
        stage={"sft": dict(steps=2, batch=4, seq=40, lr=1e-3, warmup=1),
               "grpo": dict(steps=2, batch=2, seq=40, lr=1e-3, warmup=1, group=2,
                            max_new_tokens=3),
               "dpo": dict(steps=2, batch=2, seq=40, lr=1e-3, warmup=1, beta=0.1),
               "distill": dict(steps=2, batch=2, seq=32, lr=1e-3, warmup=1)},
        student=dict(_STUDENT, hidden_size=32, head_dim=8, intermediate_size=32,
                     intermediate_size_mlp=64, attention_chunk_size=16), distill_files=1),
}


@dataclass
class Recipe:
    """Where a run's files live, and what it has recorded so far (OUT/records.json)."""
    out: str
    size: Size
    seeds: int
    base: str | None = None
    records: dict = field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def load(self):
        if os.path.isfile(self.path("records.json")):
            with open(self.path("records.json")) as f:
                self.records = json.load(f)

    def stage(self, key: str, make):
        """The record of stage `key`: computed by make() once, then read back."""
        if key not in self.records:
            t0 = time.time()
            print(f"--- post_train: {key}", file=sys.stderr, flush=True)
            self.records[key] = {**make(), "wall_s": round(time.time() - t0, 1)}
            with open(self.path("records.json.tmp"), "w") as f:
                json.dump(self.records, f, indent=1)
            os.replace(self.path("records.json.tmp"), self.path("records.json"))
        return self.records[key]


def train_flags(size: Size, stage: str, seed: int) -> list[str]:
    flags = ["--seed", str(seed), "--no-progress", "--no-async", "--resume", "--keep", "1"]
    s = size.stage[stage]
    flags += ["--save-every", str(s["steps"])]
    for k, v in s.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def run_train(argv: list[str]):
    from experiments import train
    train.main(argv)


def set_flags(fields: dict) -> list[str]:
    out = []
    for k, v in fields.items():
        text = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        out += ["--set", f"{k}={text}"]
    return out


def load(path: str):
    from experiments.train import load_init
    cfg, params = load_init(path)
    return cfg.replace(dtype="float32"), params


# ---- data ----------------------------------------------------------------------------------------

def make_data(r: Recipe) -> dict:
    """The tasks (train / held out), the noisy SFT records and the DPO pairs of both splits."""
    from experiments import make_tasks
    from experiments.make_tasks import write_jsonl
    os.makedirs(r.path("data"), exist_ok=True)
    z = r.size
    make_tasks.main(["reverse", "--n", str(z.tasks), "--digits", str(z.digits), "--chat",
                     "--split", str(z.tasks - z.held_out), "--out", r.path("data", "tasks.jsonl")])
    rng = np.random.default_rng(0)
    sft, correct = [], []
    for t in _read(r.path("data", "tasks.jsonl")):
        right = bool(rng.random() < 0.5)
        letters = t["answer"][::-1]  # the prompt's letters as written
        sft.append({"messages": t["prompt"] + [{"role": "assistant",
                                                "content": t["answer"] if right else letters}]})
        correct.append(right or letters == t["answer"])
    write_jsonl(r.path("data", "sft.jsonl"), sft)
    for split in ("tasks", "tasks.heldout"):
        write_jsonl(r.path("data", f"pairs.{split}.jsonl"), [
            {"prompt": t["prompt"], "chosen": [{"role": "assistant", "content": t["answer"]}],
             "rejected": [{"role": "assistant", "content": t["answer"][::-1]}]}
            for t in _read(r.path("data", f"{split}.jsonl")) if t["answer"] != t["answer"][::-1]])
    return {"train_tasks": z.tasks - z.held_out, "held_out_tasks": z.held_out,
            "sft_records": len(sft), "sft_correct": float(np.mean(correct)), "correct": correct}


def _read(path: str) -> list[dict]:
    from training.text import jsonl_records
    return [rec for _, rec in jsonl_records(path)]


# ---- evaluations ---------------------------------------------------------------------------------

def held_out_pass_rates(r: Recipe, ckpt: str, tok) -> dict:
    """Sampled (temperature 1, eval_samples per task) and greedy pass rates on the held-out
    tasks."""
    from training import tasks as T
    cfg, params = load(ckpt)
    held = T.read_tasks(tok, r.path("data", "tasks.heldout.jsonl"))
    new = r.size.stage["grpo"]["max_new_tokens"]
    sampled = T.pass_rates(cfg, params, tok, held, samples=r.size.eval_samples, temperature=1.0,
                           max_new_tokens=new, seed=1)
    greedy = T.pass_rates(cfg, params, tok, held, max_new_tokens=new)
    return {"pass_sampled": float(sampled.mean()), "pass_greedy": float(greedy.mean())}


def held_out_reward_accuracy(r: Recipe, policy: str, ref: str, tok) -> float:
    from training.dpo import read_pairs, reward_accuracy, sequence_logprobs
    pairs = read_pairs(tok, r.path("data", "pairs.tasks.heldout.jsonl"),
                       r.size.stage["dpo"]["seq"], tok.special.get("pad", 0))
    scores = [sequence_logprobs(*load(p), pairs, 16) for p in (policy, ref)]
    return reward_accuracy(*scores)


def stdlib_rows(r: Recipe, tok):
    """(the distillation's training files, the quickstart's held-out files packed in rows)."""
    import training
    from experiments.quickstart import stdlib_files
    train_files, eval_files = stdlib_files()
    seq = r.size.stage["distill"]["seq"]
    docs, kind = training.read_documents(tok, eval_files)
    return train_files[:r.size.distill_files], training.pack(docs, kind, seq,
                                                             tok.special.get("pad", 0))


# The per-step metrics each stage's record keeps (its curves), from its run's metrics.jsonl.
CURVES = {"sft": ("ce",), "grpo": ("pass_rate", "kl", "groups_kept"),
          "dpo": ("dpo", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"),
          "student_hard": ("ce",), "student_distill": ("ce",)}


def history(r: Recipe, stage: str, seed: int) -> dict:
    from training import read_metrics
    ms = read_metrics(r.path(f"{stage}{seed}"))
    return {k: [m[k] for m in ms] for k in CURVES[stage]}


def reread_curves(r: Recipe):
    """Each recorded stage's curves read anew from its run (--report: after CURVES changed)."""
    for key in r.records:
        stage, _, seed = key.partition("/")
        if stage in CURVES and os.path.isdir(r.path(f"{stage}{seed}")):
            r.records[key].update(history(r, stage, int(seed)))


# ---- the stages ----------------------------------------------------------------------------------

def run_recipe(r: Recipe):
    from experiments import filter_easy, quickstart
    from experiments.quickstart import held_out_bits
    from training import load_tokenizer
    r.load()
    base = r.base or r.path("base", "model")
    if r.base is None:
        r.stage("base", lambda: _quickstart(r, quickstart))
    own = os.path.join(base, "tokenizer.json")
    tok_flags = ["--tokenizer", own] if os.path.isfile(own) else []
    tok = load_tokenizer(own if os.path.isfile(own) else None)
    data = r.stage("data", lambda: make_data(r))
    r.stage("base_eval", lambda: held_out_pass_rates(r, base, tok))

    def filtered():
        filter_easy.main(["--judge", base, "--data", r.path("data", "sft.jsonl"),
                          "--out", r.path("data", "sft.kept.jsonl"), "--drop-fraction", "0.5",
                          "--seq", str(r.size.stage["sft"]["seq"]), *tok_flags])
        with open(r.path("data", "sft.kept.jsonl.report.json")) as f:
            lines = json.load(f)["lines"]
        kept = np.array([x["kept"] for x in lines])
        loss = np.array([x["judge_loss"] for x in lines])
        right = np.array(data["correct"])
        return {"kept": int(kept.sum()), "dropped": int((~kept).sum()),
                "loss_kept": float(loss[kept].mean()), "loss_dropped": float(loss[~kept].mean()),
                "correct_kept": float(right[kept].mean()),
                "correct_dropped": float(right[~kept].mean())}
    r.stage("filter", filtered)

    files, held_rows = stdlib_rows(r, tok)
    for seed in range(r.seeds):
        def sft(seed=seed):
            out = r.path(f"sft{seed}")
            run_train(["--init", base, "--data", r.path("data", "sft.kept.jsonl"), "--out", out,
                       *train_flags(r.size, "sft", seed)])
            return {**history(r, "sft", seed), **held_out_pass_rates(r, out, tok)}
        r.stage(f"sft/{seed}", sft)

        def grpo(seed=seed):
            out = r.path(f"grpo{seed}")
            run_train(["--objective", "grpo", "--init", r.path(f"sft{seed}"),
                       "--data", r.path("data", "tasks.jsonl"), "--out", out,
                       *train_flags(r.size, "grpo", seed)])
            return {**history(r, "grpo", seed),
                    **held_out_pass_rates(r, out, tok)}
        r.stage(f"grpo/{seed}", grpo)

        def dpo(seed=seed):
            out, init = r.path(f"dpo{seed}"), r.path(f"grpo{seed}")
            run_train(["--objective", "dpo", "--init", init,
                       "--data", r.path("data", "pairs.tasks.jsonl"), "--out", out,
                       *train_flags(r.size, "dpo", seed)])
            return {**history(r, "dpo", seed),
                    "held_reward_accuracy": held_out_reward_accuracy(r, out, init, tok),
                    **held_out_pass_rates(r, out, tok)}
        r.stage(f"dpo/{seed}", dpo)

        # Each seed's students beside its chain: a run cut short has every stage for its seeds.
        r.stage("teacher", lambda: {"held_bits": held_out_bits(*load(base), held_rows)})
        for how in ("hard", "distill"):
            def student(seed=seed, how=how):
                out = r.path(f"student_{how}{seed}")
                objective = (["--objective", "distill", "--teacher", base] if how == "distill"
                             else ["--objective", "sft"])
                run_train([*objective, "--preset", "tiny", *set_flags(r.size.student),
                           *tok_flags, "--data", *files, "--out", out,
                           *train_flags(r.size, "distill", seed)])
                return {**history(r, f"student_{how}", seed),
                        "held_bits": held_out_bits(*load(out), held_rows)}
            r.stage(f"student_{how}/{seed}", student)


def _quickstart(r: Recipe, quickstart) -> dict:
    out = r.path("base")
    quickstart.main(["--out", out, "--steps", str(r.size.base_steps), "--max-new-tokens", "40"])
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {k: s[k] for k in ("steps", "held_out_bits_per_byte", "final_train_bits_per_byte")}


def parse_args(argv=None):
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--size", default="default", choices=sorted(SIZES))
    ap.add_argument("--seeds", type=int, help="seeds per stage (default: the size's)")
    ap.add_argument("--base", help="start from this checkpoint instead of training the quickstart")
    ap.add_argument("--out", default="runs/post_train", help="run directory")
    ap.add_argument("--results", help="results directory (default: experiments/results, "
                                      "with --size smoke OUT/results)")
    ap.add_argument("--report", action="store_true",
                    help="write the results from OUT's records so far; train nothing")
    return ap.parse_args(argv)


def command(args) -> str:
    cmd = "python -m experiments.post_train"
    if args.size != "default":
        cmd += f" --size {args.size}"
    if args.seeds:
        cmd += f" --seeds {args.seeds}"
    return cmd + (f" --base {args.base}" if args.base else "")


def main(argv=None):
    args = parse_args(argv)
    size = SIZES[args.size]
    seeds = args.seeds or size.seeds
    if seeds < 1:
        sys.exit("error: --seeds must be >= 1")
    if args.base is not None and not os.path.isdir(args.base):
        sys.exit(f"error: --base {args.base!r} is not a directory")
    os.makedirs(args.out, exist_ok=True)
    import jax
    # Seeds after the first find each compiled program on disk (unless the caller set a cache
    # already); set before JAX compiles anything.
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.abspath(os.path.join(args.out, "jax_cache")))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from experiments import post_train_report
    r = Recipe(args.out, size, seeds, args.base)
    if args.report:
        r.load()
        reread_curves(r)
    else:
        run_recipe(r)
    results = args.results or (os.path.join(args.out, "results") if args.size == "smoke"
                               else DEFAULT_RESULTS)
    post_train_report.write(r.records, seeds, size, command(args), results)
    print(f"post-training results in {results}/post_training.md", file=sys.stderr)


if __name__ == "__main__":
    main()
