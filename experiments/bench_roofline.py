"""Speed against the machine's own limits, in one run: decode against the read bandwidth, prefill
against the matmul peak, long prompts against short ones, and HF beside them.

    python -m experiments.bench_roofline [--batch 4] [--prompt 128] [--steps 32] [--repeats 5]
        [--hidden 256] [--long 512,8192] [--no-hf]

The machine: read bandwidth (over 256 MB of fp32: XLA's sum, torch's sum and dot on its default
threads) and fp32 matmul FLOP/s (2048^3, XLA and torch); the best figure is the limit, since any
of them could have been used. The probes take turns with the model's runs in one timing loop.

The model: bench_forward's mid-size random model (D=256, 8 layers, 16 experts, fp32; --hidden
widens it, F = 2D). Its weights are counted from `model.config.param_count`:
- a decode step (batch B, top-1) must read every weight but the embedding table (B rows of it)
  and the routed experts, of which it reads the distinct ones the step picks: E (1 - (1 - 1/E)^B)
  per MoE layer on average for uniform routing, plus each layer's filled cache (chunked layers
  at most a chunk of it). Roofline = those bytes / bandwidth; the fraction is roofline / step.
- a prefill (model.forward, B x 512) does 2 FLOPs per active matmul weight per token (the LM
  head included, the embedding lookup not) plus the causal attention's 4 N H FLOPs per key seen
  (within its chunk on chunked layers). Fraction = those FLOPs / time / peak.
Decode runs every parameter layout (model/runtime.py) and marks the one `resolve` picks. Long
prompts: one row of each --long length through `sampling.prefill` (pieces of 512), in tokens/s.
"""
from __future__ import annotations

from experiments import cli
from experiments.bench_forward import bench_config

GB = 1e9
READ_FLOATS = 1 << 26  # the length of the read probes' fp32 array (256 MB)


def machine_probes():
    """{(what, how): (fn, amount)}: read GB/s and matmul GFLOP/s probes, by XLA and by torch;
    figure = amount / seconds of fn."""
    import jax
    import jax.numpy as jnp
    import torch

    n, m = READ_FLOATS, 2048
    a = jnp.ones((n,), jnp.float32)
    x, y = (jnp.ones((m, m), jnp.float32) for _ in range(2))
    at, xt, yt = torch.ones(n), torch.ones(m, m), torch.ones(m, m)
    xla_sum, xla_mm = jax.jit(jnp.sum), jax.jit(jnp.matmul)
    read, flops = 4 * n / GB, 2 * m ** 3 / GB
    return {("read GB/s", "XLA sum"): (lambda: xla_sum(a).block_until_ready(), read),
            ("read GB/s", "torch sum"): (lambda: at.sum(), read),
            ("read GB/s", "torch dot"): (lambda: at.dot(at), read),
            ("matmul GFLOP/s", "XLA"): (lambda: xla_mm(x, y).block_until_ready(), flops),
            ("matmul GFLOP/s", "torch"): (lambda: xt @ yt, flops)}


def decode_bytes(cfg, batch: int, filled: int) -> float:
    """Bytes one decode step of `batch` rows must read, with `filled` positions in the cache."""
    from model.config import param_count
    t = cfg.text
    E, D = t.num_experts, t.hidden_size
    expert = 3 * D * t.intermediate_size
    distinct = E * (1 - (1 - 1 / E) ** (batch * t.experts_per_token))
    weights = (param_count(cfg)["text"] - t.vocab_size * D + batch * D
               - len(t.moe_layers) * (E - distinct) * expert)
    cache = sum(min(filled, t.attention_chunk_size) if s.chunked else filled
                for s in t.layer_specs) * batch * 2 * t.num_kv_heads * t.head_dim
    return 4 * (weights + cache)


def prefill_flops(cfg, batch: int, seq: int) -> float:
    """Useful FLOPs of a causal forward of batch x seq tokens (matmuls and attention)."""
    from model.config import param_count
    t = cfg.text
    norms = (2 * t.num_layers + 1) * t.hidden_size  # RMS norm scales: no matmul
    matmul = param_count(cfg)["text_active"] - t.vocab_size * t.hidden_size - norms
    keys = 0
    for s in t.layer_specs:
        span = t.attention_chunk_size if s.chunked else seq
        keys += sum(p % span + 1 for p in range(seq))
    return batch * (2 * matmul * seq + 4 * t.num_heads * t.head_dim * keys)


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128, help="decode: prompt tokens before it")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--seq", type=int, default=512, help="prefill: tokens per row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--long", default="512,8192", help="prompt lengths of the long-prompt rows")
    ap.add_argument("--no-hf", action="store_true", help="leave HF out")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import model
    from experiments.hf_reference import hf_text_model, params_from_hf
    from experiments.timing import timed
    from model import sampling

    D = args.hidden
    hf = hf_text_model(bench_config(eos_token_id=None, pad_token_id=0, hidden_size=D,
                                    intermediate_size=2 * D, intermediate_size_mlp=4 * D),
                       seed=0)
    cfg, params = params_from_hf(hf)
    B, T, n = args.batch, args.prompt, args.steps
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.text.vocab_size, (B, T))
    stop = jnp.asarray([-1], jnp.int32)

    def decode(layout):
        rt = model.resolve(cfg, "decode", layout=layout)
        viewed = rt.view_params(params)
        # Room for every timed call: each runs n more steps on the state the last one left.
        _, state = sampling.prefill(cfg, params, prompt, max_new_tokens=n * (args.repeats + 2))
        box = [state._replace(cache=rt.view_cache(state.cache))]

        def run():
            out, box[0] = sampling.decode(cfg, rt, viewed, box[0], stop, 0, n, steps=n,
                                          temperature=0.0, top_k=None, top_p=None)
            jax.block_until_ready(out)
        return run

    ids = rng.integers(0, cfg.text.vocab_size, (B, args.seq))
    ids_t = torch.tensor(ids)

    def hf_forward():
        with torch.no_grad():
            return hf(ids_t).logits

    def hf_generate(k):
        def run():
            with torch.no_grad():
                p = torch.tensor(prompt)
                return hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=k,
                                   min_new_tokens=k, do_sample=False, pad_token_id=0)
        return run

    layouts = ("stacked", "blocks", "experts")
    picked = model.resolve(cfg, "decode").layout
    fns = [decode(lay) for lay in layouts]
    fns.append(lambda: jax.block_until_ready(model.forward(cfg, params, ids)))
    if not args.no_hf:
        fns += [hf_forward, hf_generate(1), hf_generate(1 + n)]
    # The machine's probes take their turns with the model, so that its drift (this machine's
    # bandwidth moves by tens of percent from minute to minute) shifts the limits alike.
    probes = machine_probes()
    times = timed(*fns, *(fn for fn, _ in probes.values()), repeats=args.repeats)
    limits = {k: amount / t for (k, (_, amount)), t in zip(probes.items(), times[len(fns):])}
    bandwidth = max(v for (k, _), v in limits.items() if k == "read GB/s")
    peak = max(v for (k, _), v in limits.items() if k == "matmul GFLOP/s")
    steps = dict(zip(layouts, (t / n for t in times[:3])))
    t_prefill = times[3]

    filled = T + n * (args.repeats + 2) // 2  # the cache's mean fill over the timed calls
    nbytes = decode_bytes(cfg, B, filled)
    roof = nbytes / (bandwidth * GB)
    flops = prefill_flops(cfg, B, args.seq)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"(threads {torch.get_num_threads()})")
    print("machine: " + ", ".join(f"{k} {lib} {v:.1f}" for (k, lib), v in limits.items()))
    print(f"limits used: read {bandwidth:.1f} GB/s, matmul {peak:.1f} GFLOP/s")
    print(f"model: D={D}, {cfg.text.num_layers} layers, {cfg.text.num_experts} experts, fp32")
    print(f"decode, batch {B}, cache about {filled} positions: {nbytes / 1e6:.1f} MB a step, "
          f"roofline {roof * 1e3:.2f} ms")
    for lay, s in steps.items():
        mark = "  <- resolve's choice" if lay == picked else ""
        print(f"  {lay:8s} {s * 1e3:7.2f} ms/step  {nbytes / s / GB:5.1f} GB/s  "
              f"{roof / s:6.1%} of the bandwidth roofline{mark}")
    print(f"prefill, model.forward {B} x {args.seq}: {flops / 1e9:.1f} GFLOP in "
          f"{t_prefill * 1e3:.1f} ms, {flops / t_prefill / GB:.1f} GFLOP/s, "
          f"{flops / t_prefill / GB / peak:.1%} of the matmul peak")
    if not args.no_hf:
        hf_step = (times[6] - times[5]) / n
        print(f"HF: forward {times[4] * 1e3:.1f} ms (ours {times[4] / t_prefill:.2f}x faster), "
              f"decode {hf_step * 1e3:.2f} ms/step (ours, {picked}, "
              f"{hf_step / steps[picked]:.2f}x faster)")
    lengths = [int(x) for x in args.long.split(",") if x]
    if lengths:
        rates = {}
        for L in lengths:
            one = rng.integers(3, cfg.text.vocab_size, (1, L))
            run = lambda: jax.block_until_ready(  # noqa: E731
                sampling.prefill(cfg, params, one, max_new_tokens=1)[1])
            rates[L] = L / timed(run, repeats=3)[0]
        base = rates[lengths[0]]
        print("long prompts, one row, pieces of 512: " + ", ".join(
            f"{L} tokens {r:.0f} tok/s ({r / base:.0%})" for L, r in rates.items()))


if __name__ == "__main__":
    main()
