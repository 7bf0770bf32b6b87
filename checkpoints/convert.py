"""Command line for checkpoint conversion (see checkpoints.conversion).

    python -m checkpoints.convert SRC DST [--dtype bfloat16|float32]   # HF dir -> Orbax dir
    python -m checkpoints.convert SRC DST --quantize int4_mixed        # ... quantized, streamed
    python -m checkpoints.convert SRC DST --to hf                      # Orbax dir -> HF dir

--quantize takes a recipe of model/quantization.py (int8, int4_mixed, fp8_mixed); Meta's FP8
checkpoints convert as they are (fp8_mixed) without it.

Bad input prints one `error: ...` line naming the file or tensor and exits 1, leaving no DST.
An Orbax SRC is checked against its integrity record first (--no-verify skips it); HF tensors
holding NaN or inf are named in a `warning: ...` line.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from checkpoints import hf
from checkpoints.conversion import hf_to_orbax, orbax_to_hf
from checkpoints.errors import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="HF directory (or an Orbax directory with --to hf)")
    p.add_argument("dst", type=Path, help="output directory; must not exist")
    p.add_argument("--to", choices=("orbax", "hf"), default="orbax")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="dtype to store (default: the source's)")
    p.add_argument("--quantize", metavar="RECIPE",
                   help="quantize the weights: int8, int4_mixed or fp8_mixed")
    p.add_argument("--max-shard-bytes", type=int, default=hf.MAX_SHARD_BYTES,
                   help="with --to hf: start a new safetensors shard beyond this size")
    p.add_argument("--no-verify", action="store_true",
                   help="with --to hf: skip checking SRC against its integrity record")
    args = p.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if args.to == "orbax":
                hf_to_orbax(args.src, args.dst, args.dtype, quantize=args.quantize)
            else:
                orbax_to_hf(args.src, args.dst, args.dtype, max_shard_bytes=args.max_shard_bytes,
                            verify=not args.no_verify)
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
