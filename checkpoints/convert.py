"""Command line for checkpoint conversion (see checkpoints.conversion).

    python -m checkpoints.convert SRC DST [--dtype bfloat16|float32]   # HF dir or run -> Orbax
    python -m checkpoints.convert SRC DST --quantize int4_mixed        # HF dir -> Orbax, quantized
    python -m checkpoints.convert SRC DST --to hf                      # Orbax dir or run -> HF

--quantize takes a recipe of model/quantization.py (int8, int4_mixed, fp8_mixed), applied slab
by slab as the weights stream; Meta's FP8 checkpoints convert as they are (fp8_mixed) without it.
SRC is an HF directory, an Orbax directory of this package, or a training run directory of
experiments.train (its latest step) or one step of it, OUT/<step>. The tokenizer and the other
non-weight files (tokenizer_config.json, generation_config.json, the chat template,
preprocessor_config.json, ...) go along. Bad input prints one `error: ...` line naming the file or
tensor and exits 1, leaving no DST. An Orbax SRC is checked against its integrity record first
(--no-verify skips it); HF tensors holding NaN or inf are named in a `warning: ...` line.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="HF directory, Orbax directory or training run")
    p.add_argument("dst", type=Path, help="output directory; must not exist")
    p.add_argument("--to", choices=("orbax", "hf"), default="orbax",
                   help="output format (default: orbax)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="dtype to store (default: the source's)")
    p.add_argument("--quantize", metavar="RECIPE",
                   help="quantize the weights (HF to Orbax): int8, int4_mixed or fp8_mixed")
    p.add_argument("--max-shard-bytes", type=int,
                   help="with --to hf: start a new safetensors shard beyond this size "
                        "(default: 5 GB, as HF's save_pretrained)")
    p.add_argument("--no-verify", action="store_true",
                   help="with --to hf: skip checking an Orbax SRC against its integrity record")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from checkpoints.conversion import convert
    from checkpoints.errors import CheckpointError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shard = {} if args.max_shard_bytes is None else {"max_shard_bytes": args.max_shard_bytes}
        try:
            convert(args.src, args.dst, args.to, args.dtype, quantize=args.quantize,
                    verify=not args.no_verify, **shard)
        except CheckpointError as e:
            error = e
        else:
            error = None
    for w in caught:
        if issubclass(w.category, UserWarning):  # ours; libraries' deprecations stay quiet
            print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
