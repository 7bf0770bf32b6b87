"""Generation speed: our prefill + jitted decode loop against HF `generate`, on CPU, one run.

    python -m experiments.bench_generate [--batch 4] [--prompt 128] [--new 64] [--repeats 5]
    python -m experiments.bench_generate --quantize int8     # + ours on int8 weights, same run

The mid-size random model of bench_forward (D=256, 8 layers, 16 experts, fp32) on both sides,
greedy, no stop token. Prefill speed = prompt tokens / time to the first new token's logits;
decode speed = new tokens / time of the rest. HF is timed the same way: a 1-token generate for
its prefill, and the difference to an N-token generate for its decode. --quantize RECIPE...
adds our generation on weights quantized by each recipe (model/quantization.py), and the
fraction of the fp32 decode step each takes (model/kernels/quantized.py says why it does not
fall on this CPU).
"""
from __future__ import annotations

from experiments import cli
from experiments.bench_forward import bench_config


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quantize", nargs="*", default=[], metavar="RECIPE")
    args = ap.parse_args()
    import jax
    import numpy as np
    import torch

    from experiments.hf_reference import hf_text_model, params_from_hf
    from experiments.timing import timed
    from model import sampling
    from model.quantization import quantize_params

    hf = hf_text_model(bench_config(eos_token_id=None, pad_token_id=0), seed=0)
    cfg, params = params_from_hf(hf)
    ids = np.random.default_rng(0).integers(3, cfg.text.vocab_size, (args.batch, args.prompt))
    ids_t = torch.tensor(ids)

    def hf_generate(n):
        def run():
            with torch.no_grad():
                return hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)
        return run

    def ours_prefill(params):
        def run():
            _, state = sampling.prefill(cfg, params, ids, max_new_tokens=args.new)
            return jax.block_until_ready(state)
        return run

    def ours_generate(params):
        def run():
            _, state = sampling.prefill(cfg, params, ids, max_new_tokens=args.new)
            out = list(sampling.decode_stream(cfg, params, state, max_new_tokens=args.new,
                                              stop_tokens=[]))
            assert out[0].shape == (args.batch, args.new)
            return out
        return run

    variants = {"ours": params} | {f"ours {r}": quantize_params(cfg, params, r)
                                   for r in args.quantize}
    times = timed(hf_generate(1), hf_generate(args.new),
                  *(f(p) for p in variants.values() for f in (ours_prefill, ours_generate)),
                  repeats=args.repeats)
    hf_pre, hf_all, our_pre, our_all = times[:4]
    prompt_tokens, new_tokens = args.batch * args.prompt, args.batch * (args.new - 1)
    rows = {"HF generate": (hf_pre, hf_all - hf_pre)} | {
        name: (pre, total - pre)
        for name, pre, total in zip(variants, times[2::2], times[3::2])}
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, torch "
          f"threads {torch.get_num_threads()}; batch {args.batch}, prompt {args.prompt}, "
          f"new {args.new}, greedy")
    for name, (pre, dec) in rows.items():
        print(f"{name:12s} prefill {prompt_tokens / pre:9.0f} tok/s   decode {new_tokens / dec:8.1f} tok/s")
    print(f"speed vs HF: prefill {hf_pre / our_pre:.2f}x, decode "
          f"{(hf_all - hf_pre) / (our_all - our_pre):.2f}x")
    for name in list(variants)[1:]:
        print(f"{name}: decode step {rows[name][1] / rows['ours'][1]:.2f}x the fp32 one's, "
              f"prefill {rows[name][0] / rows['ours'][0]:.2f}x")


if __name__ == "__main__":
    main()
