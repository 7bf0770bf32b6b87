"""KV-cache memory of a preset at a few context lengths: the hybrid layout against all-global.

    python -m experiments.kv_memory [--preset scout] [--batch 1] [--bytes 2] [--kv-dtype int8]

Chunked (RoPE) layers keep a ring buffer of attention_chunk_size positions; only the global
(NoPE) layers grow with the context (model/kv_cache.py). --kv-dtype int8 or fp8: one byte a
value plus a scale in the compute dtype per head and position (Config.kv_dtype).
"""
from __future__ import annotations

from experiments import cli


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--preset", default="scout", choices=cli.PRESETS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bytes", type=float, default=2, help="bytes per value (2: bf16)")
    ap.add_argument("--kv-dtype", choices=("int8", "fp8"), default=None,
                    help="an 8-bit cache (overrides --bytes)")
    args = ap.parse_args()
    import model
    from model import kv_cache
    cfg = model.preset(args.preset).replace(kv_dtype=args.kv_dtype)
    if args.kv_dtype:  # one byte and a compute-dtype scale per head_dim values
        args.bytes = kv_cache.cache_bytes(cfg, 1, 1) / kv_cache.cache_bytes(cfg, 1, 1, 1)
    every_layer_global = cfg.replace_text(attention_chunk_size=None)
    t = cfg.text
    per_token = 2 * t.num_kv_heads * t.head_dim * args.bytes * len(t.nope_layers)
    print(f"{args.preset}: {len(t.nope_layers)} global layers grow by {per_token / 1024:.0f} KiB "
          f"a token; {t.num_layers - len(t.nope_layers)} chunked layers hold "
          f"{t.attention_chunk_size} positions each (batch {args.batch}, {args.bytes:.3g} B/value"
          f"{', ' + args.kv_dtype if args.kv_dtype else ''})")
    print(f"{'context':>10s} {'hybrid cache':>14s} {'all-global':>12s}")
    for ctx in (131072, 1 << 20, 10 * (1 << 20)):
        hybrid = kv_cache.cache_bytes(cfg, args.batch, ctx, args.bytes)
        full = kv_cache.cache_bytes(every_layer_global, args.batch, ctx, args.bytes)
        print(f"{ctx:>10d} {hybrid / 2**30:>10.1f} GiB {full / 2**30:>8.1f} GiB")


if __name__ == "__main__":
    main()
