"""The main job: train a small Llama 4 on the Python standard library's own source, on CPU.

    python -m experiments.quickstart [--out runs/quickstart] [--steps N]

Run again after a kill, it resumes from its latest checkpoint (OUT/quickstart.json marks a
directory as a quickstart run; any other non-empty OUT is refused, and nothing in it touched).

Every Llama 4 feature is on: MoE layers (sigmoid top-1 router, the score on the expert input)
with a shared expert, iRoPE (three chunked-attention RoPE layers with QK norm, then one global
NoPE layer with temperature tuning; the chunk is shorter than the row and floor_scale small, so
both act), fp32 on CPU. The data are the stdlib's top-level *.py files (no download), as bytes;
every 20th file is held out. The run then reloads its Orbax checkpoint, exports it with
`checkpoints.save` (beside a tokenizer.json, so `python -m experiments.generate --ckpt
OUT/model` works too), completes a Python prompt with `model.generate`, and writes the loss
curve to OUT/loss.png. It prints wall time, losses and the byte-unigram entropy, in bits per byte.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import time
from typing import TYPE_CHECKING

import numpy as np

from experiments import cli

if TYPE_CHECKING:
    from model.config import Config
    from training import OptimConfig, RunConfig

# JAX and the packages over it are imported where used, so that --help answers at once.

MARKER = "quickstart.json"
PROMPT = "import os\n\n\ndef read_lines(path):\n"
SEQ, BATCH = 256, 8
TEMPERATURE = 0.5


def quickstart_config(tok) -> Config:
    from model.config import Config, TextConfig
    text = TextConfig(
        vocab_size=tok.vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=256, intermediate_size_mlp=512, num_experts=4,
        experts_per_token=1, moe_layers=(0, 1, 2, 3), nope_layers=(3,),
        attention_chunk_size=64, rope_theta=10000.0, rope_scaling=None, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=32.0, attn_scale=0.1,
        max_position_embeddings=2048, router_aux_loss_coef=0.01,
        bos_token_id=tok.special["bos"], eos_token_ids=tuple(tok.stop_ids),
        pad_token_id=tok.special["pad"])
    return Config(text=text, vision=None, dtype="float32")


def stdlib_files() -> tuple[list[str], list[str]]:
    root = sysconfig.get_paths()["stdlib"] or os.path.dirname(os.__file__)
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    return [f for i, f in enumerate(files) if i % 20], files[::20]


def unigram_entropy_bits(rows) -> float:
    """Entropy of the byte (token) distribution of the scored tokens: the loss of the best model
    that ignores context."""
    counts = np.bincount(rows.tokens[rows.weights > 0])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def held_out_bits(cfg, params, rows, batches: int = 8) -> float:
    import training
    from training.step import eval_step
    b = training.Batches(rows, BATCH, seed=0)
    ce = [float(eval_step(cfg, params, b.batch_at(i))["ce"]) for i in range(min(batches, len(rows) // BATCH))]
    return statistics.mean(ce) / math.log(2)


def loss_figure(history, entropy, held_out):
    """The loss curve in bits per byte: per step, smoothed, the unigram entropy and held-out loss."""
    import matplotlib.pyplot as plt
    steps = [m["step"] for m in history]
    bits = [m["ce"] / math.log(2) for m in history]
    smooth, ema = [], bits[0]
    for b in bits:
        ema = 0.9 * ema + 0.1 * b
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, bits, lw=0.8, alpha=0.35, color="C0")
    ax.plot(steps, smooth, lw=1.5, color="C0", label="train loss (EMA 0.9)")
    ax.axhline(entropy, color="gray", ls="--", label=f"byte unigram entropy ({entropy:.2f})")
    ax.scatter([steps[-1]], [held_out], color="red", zorder=3,
               label=f"held-out files ({held_out:.2f})")
    ax.set(xlabel="step", ylabel="bits per byte", ylim=(0, max(bits[0], entropy) * 1.05),
           title="Llama 4 (MoE, iRoPE) on the Python stdlib, CPU")
    ax.legend()
    fig.tight_layout()
    return fig


def plot(history, entropy, held_out, path):
    import matplotlib
    matplotlib.use("Agg")
    loss_figure(history, entropy, held_out).savefig(path, dpi=120)


def optim_config(steps: int) -> OptimConfig:
    from training import OptimConfig
    return OptimConfig(lr=1.5e-3, warmup=min(40, steps // 10), steps=steps, min_lr_ratio=0.1,
                       weight_decay=0.1, clip=1.0)


def run_config(out: str, save_every: int = 100) -> RunConfig:
    """An earlier run in OUT continues from its latest checkpoint (from scratch if it had none);
    its settings must match (training refuses a different run, naming the field)."""
    from training import RunConfig
    return RunConfig(out=out, batch=BATCH, seq=SEQ, seed=0, save_every=save_every, keep=2,
                     resume=True)


def claim_out(out: str, settings: dict):
    """Make OUT a quickstart run directory (or find that it is one), before anything else is
    written to it. The marker is written first, so a kill at any later point leaves a directory
    that the next run recognises and resumes."""
    marker = os.path.join(out, MARKER)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(marker):
        sys.exit(f"error: {out} exists and is not a quickstart run (it has no {MARKER}); "
                 "choose another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: {out} exists and is not a directory; choose another --out")
    os.makedirs(out, exist_ok=True)
    with open(marker + ".tmp", "w") as f:
        json.dump(settings, f)
    os.replace(marker + ".tmp", marker)


def parse_args(argv=None):
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--out", default="runs/quickstart", help="run directory (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=800, help="training steps (default: %(default)s)")
    ap.add_argument("--save-every", type=int, default=100,
                    help="steps between checkpoints (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=300,
                    help="length of the completion (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import training
    try:
        _main(args)
    except (training.SettingsError, training.ResumeError, training.DivergedError) as e:
        sys.exit(f"error: {e}")


def versus_entropy(final: float, entropy: float) -> str:
    """Where the final loss stands against the byte unigram entropy (both bits/byte)."""
    if final < entropy:
        return (f"{entropy - final:.2f} bits/byte below the byte unigram entropy of the corpus, "
                f"{entropy:.3f} (train loss = {final / entropy:.0%} of it)")
    return (f"{final - entropy:.2f} bits/byte above the byte unigram entropy of the corpus, "
            f"{entropy:.3f}: too few steps to learn even how often each byte occurs")


def _main(args):
    import jax
    import checkpoints
    import model
    import training
    t_start = time.time()
    optim, run = optim_config(args.steps), run_config(args.out, args.save_every)
    claim_out(args.out, {"steps": args.steps, "save_every": args.save_every})

    tok = training.byte_tokenizer()
    cfg = quickstart_config(tok)
    train_files, eval_files = stdlib_files()
    docs, kind = training.read_documents(tok, train_files)
    rows = training.pack(docs, kind, SEQ, tok.special["pad"])
    eval_rows = training.pack(training.read_documents(tok, eval_files)[0], kind, SEQ,
                              tok.special["pad"])
    entropy = unigram_entropy_bits(rows)
    counts = model.config.param_count(cfg)
    print(f"{len(train_files)} stdlib files, {len(rows) * SEQ / 1e6:.1f}M bytes "
          f"({len(eval_files)} held out); model {counts['text'] / 1e6:.2f}M parameters "
          f"({counts['text_active'] / 1e6:.2f}M active per token); {args.steps} steps of "
          f"{BATCH} x {SEQ} bytes = {args.steps * BATCH * SEQ / 1e6:.1f}M bytes, "
          f"{jax.default_backend()} {cfg.dtype}", flush=True)

    t0 = time.time()
    training.train(cfg, lambda: model.init_params(cfg, jax.random.key(0)), rows, run, optim,
                   {"kind": kind, "tokenizer": "bytes"}, tokenizer=tok)
    t_train = time.time() - t0
    history = training.read_metrics(args.out)  # every step, those of earlier runs too

    # Reload from disk: the training checkpoint, then the exported inference checkpoint (made
    # anew from the final checkpoint, over any export of an earlier run).
    cfg2, params = training.load_params(args.out)
    export = os.path.join(args.out, "model")
    if os.path.exists(export):
        shutil.rmtree(export)
    checkpoints.save(export, cfg2, params)
    tok.tk.save(os.path.join(export, "tokenizer.json"))
    cfg3, params = checkpoints.load(export)
    held_out = held_out_bits(cfg3, params, eval_rows)
    # Sampled at a low temperature: greedy decoding of so small a model soon repeats itself.
    ids = model.generate(cfg3, params, [tok.encode(PROMPT)], max_new_tokens=args.max_new_tokens,
                         temperature=TEMPERATURE, seed=0, stop_tokens=tok.stop_ids)
    completion = tok.decode(ids[0], skip_special=True)

    final = statistics.mean(m["ce"] for m in history[-10:]) / math.log(2)
    tps = statistics.median(m["tokens_per_s"] for m in history[1:])
    plot(history, entropy, held_out, os.path.join(args.out, "loss.png"))
    wall = time.time() - t_start
    summary = {"wall_s": round(wall, 1), "train_s": round(t_train, 1), "steps": args.steps,
               "tokens_per_s": round(tps), "final_train_bits_per_byte": round(final, 4),
               "held_out_bits_per_byte": round(held_out, 4),
               "unigram_entropy_bits_per_byte": round(entropy, 4),
               "first_loss_bits_per_byte": round(history[0]["ce"] / math.log(2), 4),
               "completion": completion, "temperature": TEMPERATURE,
               "backend": jax.default_backend(), "cpus": os.cpu_count()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n--- completion (sampled, temperature {TEMPERATURE}) of the prompt ---\n"
          f"{completion}\n---")
    print(f"wall time {wall:.0f} s (training {t_train:.0f} s, {tps:,.0f} tokens/s median)")
    print(f"loss: {final:.3f} bits/byte (train, last 10 steps), {held_out:.3f} on held-out files; "
          + versus_entropy(final, entropy))
    print(f"checkpoints: {args.out}/<step> (training), {export} (inference); "
          f"loss curve: {args.out}/loss.png")


if __name__ == "__main__":
    main()
