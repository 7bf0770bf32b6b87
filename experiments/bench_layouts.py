"""The parameter layouts of CPU inference against each other (model/runtime.py), one run.

    python -m experiments.bench_layouts [--batch 4] [--prompt 128] [--steps 64] [--repeats 9]
        [--layers 8]

The mid-size random model of bench_forward (D=256, 8 layers, 16 experts, fp32; --layers to
deepen it). Prefill: one `extend` of the whole prompt; decode: `steps` greedy tokens in the
jitted loop, per step. Each layout takes its turn with the others, so that load drifting during
the run shifts all alike. The first call of each (compilation, mostly) is timed apart: unrolled
layouts compile in time about proportional to their size, what model/runtime.py's budgets
(MAX_BLOCKS, MAX_BRANCHES) answer.
"""
from __future__ import annotations

import time

from experiments import cli
from experiments.bench_forward import bench_config


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import model
    from experiments.hf_reference import hf_text_model, params_from_hf
    from model import kv_cache, sampling

    cfg, params = params_from_hf(hf_text_model(bench_config(
        eos_token_id=None, pad_token_id=0, num_hidden_layers=args.layers)))
    B, T, n = args.batch, args.prompt, args.steps
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.text.vocab_size, (B, T)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    stop = jnp.asarray([-1], jnp.int32)

    def prefill(layout):
        rt = model.resolve(cfg, "prefill", layout=layout).replace(cache_empty=True)
        p = rt.view_params(params)

        def run():  # -> seconds of the prefill alone
            cache = jax.block_until_ready(rt.view_cache(kv_cache.init_cache(cfg, B, T + n)))
            t0 = time.perf_counter()
            out = sampling.extend(cfg, rt, p, ids, pos, cache, last_only=True)
            jax.block_until_ready(out)
            return time.perf_counter() - t0, out
        return run

    def decode(layout):
        rt = model.resolve(cfg, "decode", layout=layout)
        make_state = prefill("stacked" if layout == "stacked" else "blocks")
        p = rt.view_params(params)

        def run():  # -> seconds per step of the loop alone
            _, (logits, cache) = make_state()
            state = sampling.DecodeState(logits[:, -1], jnp.full((B,), T, jnp.int32), cache,
                                         jnp.zeros((B,), bool), jax.random.key(0))
            t0 = time.perf_counter()
            jax.block_until_ready(sampling.decode(cfg, rt, p, state, stop, 0, n, steps=n,
                                                  temperature=0.0, top_k=None, top_p=None))
            return (time.perf_counter() - t0) / n, None
        return run

    runs = {f"prefill {lay}": prefill(lay) for lay in ("stacked", "blocks")}
    runs.update({f"decode {lay}": decode(lay) for lay in ("stacked", "blocks", "experts")})
    times, first = {k: [] for k in runs}, {}
    for i in range(args.repeats + 1):  # in turns; the first round compiles and is dropped
        for k, run in runs.items():
            t0 = time.perf_counter()
            t, _ = run()
            if i:
                times[k].append(t)
            else:
                first[k] = time.perf_counter() - t0
    print(f"jax {jax.__version__} ({jax.default_backend()}); {args.layers} layers "
          f"({cfg.text.num_blocks} blocks), batch {B}, prompt {T}, {n} decode steps; medians of "
          f"{args.repeats} runs in turns; first call (compile) apart")
    for k, ts in times.items():
        unit = "ms/step" if k.startswith("decode") else "ms"
        print(f"{k:16s} {np.median(ts) * 1e3:8.2f} {unit:8s} first call {first[k]:5.1f} s")


if __name__ == "__main__":
    main()
