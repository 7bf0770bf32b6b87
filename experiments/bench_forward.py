"""Prefill speed: our `model.forward` against HF's `Llama4ForCausalLM` forward, on CPU, one run.

    python -m experiments.bench_forward [--batch 4] [--seq 512] [--repeats 5]

Same mid-size random model on both sides (D=256, 8 layers, 16 experts, fp32), same weights; prints
the median wall time of each and the speed ratio. HF runs every expert on every token.
"""
from __future__ import annotations

from experiments import cli


def bench_config(**kw):
    return {**dict(vocab_size=8192, hidden_size=256, intermediate_size=512,
                   intermediate_size_mlp=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, num_local_experts=16,
                   attention_chunk_size=256), **kw}


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    import jax
    import numpy as np
    import torch

    import model
    from experiments.hf_reference import hf_text_model, params_from_hf
    from experiments.timing import timed
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = hf_text_model(bench_config(), seed=0)
    cfg, params = params_from_hf(hf)
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (args.batch, args.seq))
    ids_t = torch.tensor(ids)

    def ours(experts):
        return lambda: jax.block_until_ready(model.forward(cfg, params, ids, experts=experts))

    def theirs():
        with torch.no_grad():
            return hf(ids_t).logits

    t_hf, t_grouped, t_dense = timed(theirs, ours(None), ours("dense"), repeats=args.repeats)
    tokens = args.batch * args.seq
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}; batch {args.batch} x seq {args.seq}")
    for name, t in [("HF Llama4ForCausalLM", t_hf), ("ours, grouped MoE", t_grouped),
                    ("ours, dense MoE", t_dense)]:
        print(f"{name:24s} {t * 1e3:9.1f} ms  {tokens / t:9.0f} tok/s  speed vs HF {t_hf / t:5.2f}x")


if __name__ == "__main__":
    main()
