"""Peak memory of prefilling long prompts on CPU: flat in the prompt length apart from the cache.

    python -m experiments.bench_long_prefill [--lengths 8192,32768,131072] [--piece 512]

A small random model (D=256, 4 layers, the last a global NoPE layer, 4 KV heads of 64; fp32)
prefills one prompt of each length in pieces of --piece tokens, each length in a process of its
own (peak RSS only grows within a process). Reported per length: the KV cache's bytes, the
process's peak RSS, and what is left after the cache and the peak of a 512-token prompt (JAX,
the weights, compiled programs): that remainder is what prefill itself holds, and it should not
grow with the prompt (a copy of the cache per piece, or a score tensor over the whole context,
would make it grow with it).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MB = 1 << 20


def bench_config():
    import model
    return model.tiny(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                      head_dim=64, intermediate_size=512, intermediate_size_mlp=1024,
                      num_experts=4, attention_chunk_size=1024, max_position_embeddings=1 << 20)


def one(length: int, piece: int) -> dict:
    """Prefill one prompt of `length` tokens here; the peak RSS of this process after it."""
    import jax
    import numpy as np

    import model
    from model import sampling
    cfg = bench_config()
    params = model.init_params(cfg, jax.random.key(0))
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (1, length))
    t0 = time.perf_counter()
    _, state = sampling.prefill(cfg, params, ids, max_new_tokens=1, prefill_chunk=piece)
    jax.block_until_ready(state)
    return {"length": length, "seconds": time.perf_counter() - t0,
            "cache_bytes": sum(a.nbytes for a in jax.tree.leaves(state.cache)),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--piece", type=int, default=512)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one length, print JSON
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.piece)))
        return
    runs = []
    for length in [args.piece] + [int(x) for x in args.lengths.split(",")]:
        out = subprocess.run([sys.executable, "-m", "experiments.bench_long_prefill", "--one",
                              str(length), "--piece", str(args.piece)], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = runs[0]["peak_rss"] - runs[0]["cache_bytes"]
    print(f"prompt pieces of {args.piece} tokens; one process per length; MB = 2^20 bytes")
    print(f"{'tokens':>8} {'cache MB':>9} {'peak RSS MB':>12} {'peak - cache - base MB':>23} "
          f"{'seconds':>8}")
    for r in runs:
        rest = r["peak_rss"] - r["cache_bytes"] - base
        print(f"{r['length']:>8} {r['cache_bytes'] / MB:>9.1f} {r['peak_rss'] / MB:>12.1f} "
              f"{rest / MB:>23.1f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
