"""Command line for checkpoint conversion (see checkpoints.conversion).

    python -m checkpoints.convert SRC DST [--dtype bfloat16|float32]   # HF dir -> Orbax dir
    python -m checkpoints.convert SRC DST --to hf                      # Orbax dir -> HF dir

Bad input prints one `error: ...` line naming the file or tensor and exits 1, leaving no DST.
"""
from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--max-shard-bytes", type=int, default=hf.MAX_SHARD_BYTES,
                   help="with --to hf: start a new safetensors shard beyond this size")
    args = p.parse_args(argv)
    try:
        if args.to == "orbax":
            hf_to_orbax(args.src, args.dst, args.dtype)
        else:
            orbax_to_hf(args.src, args.dst, args.dtype, max_shard_bytes=args.max_shard_bytes)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
