"""What each weight recipe and each 8-bit KV cache costs in accuracy, against fp32.

    python -m experiments.bench_quantized_accuracy [--ckpt runs/quickstart/model] [--seeds 3]

Two models, both fp32 on CPU:
- the quickstart's trained model (`python -m experiments.quickstart` writes it: 4 layers, D=128,
  MoE with a shared expert, bytes of Python source), scored on rows of its held-out stdlib
  files: bits per byte (cross-entropy in bits per target byte) and greedy-token agreement (the
  fraction of positions whose argmax equals fp32's). Each seed scores a different random draw
  of held-out rows; the spread is over those draws.
- a random mid-size model (D=512, 8 layers, 8 experts, F=1024; weights drawn so activations
  stay O(1), else every layer is near the identity and quantization looks free), scored on
  random tokens against its own fp32 predictions: KL(fp32 || quantized) in bits per token and
  greedy-token agreement. Each seed is a different model.
Every row is run through the KV cache in pieces of 64 tokens (model.sampling.extend), so later
pieces read what the cache stored: the float cache for the weight recipes, int8 or fp8 for the
cache rows. Differences are paired (same rows, same model) and given as mean +- sample standard
deviation over the seeds. Writes experiments/results/quantized_accuracy.{txt,json}.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from experiments import cli

# JAX is imported where used: --help and bad flags answer before it loads.
PIECE = 64
RECIPES = ("int8", "int4_mixed", "fp8_mixed")  # model.quantization.RECIPES (held equal in tests)
VARIANTS = [("fp32", None, None), *((r, r, None) for r in RECIPES),
            ("int8 cache", None, "int8"), ("fp8 cache", None, "fp8")]
RESULTS = Path(__file__).resolve().parent / "results"


def o1_params(cfg, seed=0):
    """Random params whose activations stay O(1): each matrix ~ 1/sqrt(fan in), embeddings ~ 1
    (init_params' 0.02 makes every layer nearly the identity, and quantization nearly free)."""
    import jax
    from flax import traverse_util

    import model
    from model import quantization as Q
    from model.layers import INIT_STD
    params = traverse_util.flatten_dict(model.init_params(cfg, jax.random.key(seed)))
    for p, x in params.items():
        if p[-1] == "embedding":
            params[p] = x / INIT_STD
        elif p[-1] in Q.INPUT_AXES or p[-1] == "router":
            axes = Q.INPUT_AXES.get(p[-1], (-2,))
            params[p] = x / INIT_STD / math.sqrt(math.prod(x.shape[a] for a in axes))
    return traverse_util.unflatten_dict(params)


def logits_through_cache(cfg, params, ids) -> np.ndarray:
    """log-softmax [B, T, V] of ids [B, T], run in pieces of PIECE tokens through the cache."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import model
    from model import kv_cache, sampling
    B, T = ids.shape
    rt = model.resolve(cfg, "prefill")
    cache, viewed = rt.view_cache(kv_cache.init_cache(cfg, B, T)), rt.view_params(params)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    out = []
    for s in range(0, T, PIECE):
        logits, cache = sampling.extend(cfg, rt.replace(cache_empty=s == 0), viewed,
                                        jnp.asarray(ids[:, s:s + PIECE]),
                                        jnp.asarray(pos[:, s:s + PIECE]), cache)
        out.append(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)))
    return np.concatenate(out, axis=1)


def variants(cfg, params):
    """(name, cfg, params) of fp32 and each recipe and cache dtype."""
    from model import quantization as Q
    for name, recipe, kv in VARIANTS:
        yield (name, cfg.replace(kv_dtype=kv),
               Q.quantize_params(cfg, params, recipe) if recipe else params)


def score_trained(cfg, params, rows, seeds: int, n_rows: int) -> dict:
    """{variant: [(bits per byte, agreement with fp32) per seed]} on held-out rows."""
    import numpy as np
    out = {name: [] for name, *_ in VARIANTS}
    for seed in range(seeds):
        pick = np.random.default_rng(seed).choice(len(rows), n_rows, replace=False)
        tokens, weights = rows.tokens[pick], rows.weights[pick, 1:]
        ids, targets = tokens[:, :-1], tokens[:, 1:]
        ref = None
        for name, c, p in variants(cfg, params):
            logp = logits_through_cache(c, p, ids)
            ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
            bits = float((ce * weights).sum() / weights.sum() / math.log(2))
            greedy = logp.argmax(-1)
            ref = greedy if ref is None else ref
            agree = float(((greedy == ref) * weights).sum() / weights.sum())
            out[name].append((bits, agree))
    return out


def score_random(cfg, seeds: int, batch: int, length: int) -> dict:
    """{variant: [(KL(fp32 || variant) in bits per token, agreement) per seed]}."""
    import numpy as np
    out = {name: [] for name, *_ in VARIANTS}
    for seed in range(seeds):
        params = o1_params(cfg, seed)
        ids = np.random.default_rng(seed).integers(3, cfg.text.vocab_size, (batch, length))
        ref = None
        for name, c, p in variants(cfg, params):
            logp = logits_through_cache(c, p, ids)
            ref = logp if ref is None else ref
            kl = float((np.exp(ref) * (ref - logp)).sum(-1).mean() / math.log(2))
            agree = float((logp.argmax(-1) == ref.argmax(-1)).mean())
            out[name].append((kl, agree))
    return out


def _spread(xs) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):+.4f} +- {sd:.4f}"


def table_trained(scores: dict) -> list[str]:
    base = [b for b, _ in scores["fp32"]]
    lines = [f"{'variant':<12} {'bits/byte':>18} {'vs fp32 (paired)':>20} {'relative':>18} "
             f"{'greedy agreement':>18}"]
    for name, rows in scores.items():
        bits = [b for b, _ in rows]
        delta = [b - r for b, r in zip(bits, base)]
        rel = [100 * d / r for d, r in zip(delta, base)]
        lines.append(f"{name:<12} {statistics.mean(bits):>18.4f} {_spread(delta):>20} "
                     f"{_spread(rel) + ' %':>18} {statistics.mean(a for _, a in rows):>17.2%}")
    return lines


def table_random(scores: dict) -> list[str]:
    lines = [f"{'variant':<12} {'KL bits/token':>20} {'greedy agreement':>22}"]
    for name, rows in scores.items():
        lines.append(f"{name:<12} {_spread([k for k, _ in rows]):>20} "
                     f"{_spread([a for _, a in rows]):>22}")
    return lines


def random_config():
    import model
    return model.tiny(vocab_size=512, hidden_size=512, intermediate_size=1024,
                      intermediate_size_mlp=1024, num_heads=8, num_kv_heads=2, head_dim=64,
                      num_layers=8, num_experts=8, moe_layers=(1, 3, 5, 7), nope_layers=(3, 7),
                      attention_chunk_size=64, max_position_embeddings=4096)


def main(argv=None):
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--ckpt", default="runs/quickstart/model",
                    help="the quickstart's model (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="(default: %(default)s)")
    ap.add_argument("--rows", type=int, default=32, help="held-out rows per seed "
                    "(default: %(default)s)")
    args = ap.parse_args(argv)
    import jax

    import checkpoints
    import model
    import training
    from experiments.quickstart import SEQ, stdlib_files
    t0 = time.time()
    if not Path(args.ckpt).exists():
        sys.exit(f"error: {args.ckpt} does not exist: run python -m experiments.quickstart")
    cfg, params = checkpoints.load(args.ckpt)
    tok = training.byte_tokenizer()
    _, eval_files = stdlib_files()
    docs, kind = training.read_documents(tok, eval_files)
    rows = training.pack(docs, kind, SEQ, tok.special["pad"])
    trained = score_trained(cfg, params, rows, args.seeds, args.rows)
    rcfg = random_config()
    rand = score_random(rcfg, args.seeds, batch=4, length=256)
    counts = model.config.param_count(rcfg)
    lines = [f"command: python -m experiments.bench_quantized_accuracy {' '.join(argv or sys.argv[1:])}".rstrip(),
             f"jax {jax.__version__}, {jax.default_backend()}, fp32 compute; {time.time() - t0:.0f} s",
             "", f"Quickstart model ({args.ckpt}), {args.rows} held-out rows of {SEQ} bytes per "
             f"seed, {args.seeds} seeds (different rows); mean +- sd over seeds:"]
    lines += table_trained(trained)
    lines += ["", f"Random mid-size model ({counts['text'] / 1e6:.1f}M parameters, D=512, 8 "
              f"layers, 8 experts, F=1024), 4 x 256 random tokens against its own fp32 "
              f"predictions, {args.seeds} seeds (different models):"]
    lines += table_random(rand)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantized_accuracy.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / "quantized_accuracy.json").write_text(json.dumps(
        {"trained": trained, "random": rand}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
