"""What checking an Orbax checkpoint's integrity record costs: `checkpoints.load` with and without
`verify`, and the check from the stored bytes (what a save adds to write the record).

    python -m experiments.bench_integrity [--layers 4] [--tmp DIR]

Saves random bf16 weights of a synthetic config (the one bench_convert_memory uses: ~248 MB a
layer, 262 MB of embedding and head) with `checkpoints.save`, then loads them in turns with
verify=True and verify=False (medians of 3 after a warm-up each; the files are in the page cache
after the first read, so this is the cost on a warm cache, where reading is cheapest and the
hashing's share largest). Writes experiments/results/bench_integrity.txt; deletes the checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from experiments import cli

RESULTS = Path(__file__).resolve().parent / "results" / "bench_integrity.txt"


def random_params(cfg, seed: int = 0) -> dict:
    import ml_dtypes
    import numpy as np
    from flax import traverse_util

    import checkpoints
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict({
        p: rng.standard_normal(s, np.float32).astype(ml_dtypes.bfloat16)
        for p, s in checkpoints.param_shapes(cfg).items()})


def main(argv=None):
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tmp", help="directory for the checkpoint (default: the system's)")
    args = ap.parse_args(argv)
    from flax import traverse_util

    import checkpoints
    from checkpoints import integrity, orbax_io
    from experiments.bench_convert_memory import synthetic_config
    from experiments.timing import timed
    cfg = synthetic_config(args.layers)
    params = random_params(cfg)
    nbytes = sum(x.nbytes for x in traverse_util.flatten_dict(params).values())
    root = Path(tempfile.mkdtemp(dir=args.tmp))
    try:
        path = root / "orbax"
        t0 = time.perf_counter()
        checkpoints.save(path, cfg, params)
        t_save = time.perf_counter() - t0
        del params
        stores = orbax_io.open_lazy(path / orbax_io.PARAMS)
        meta = orbax_io.read_meta(path)[3]
        t_record = timed(lambda: integrity.verify(path, meta, stores), repeats=3)[0]
        t_plain, t_checked = timed(lambda: checkpoints.load(path, verify=False),
                                   lambda: checkpoints.load(path, verify=True), repeats=3)
    finally:
        shutil.rmtree(root)
    gb = nbytes / 1e9
    lines = [
        f"command: python -m experiments.bench_integrity --layers {args.layers}",
        f"a bf16 checkpoint of {gb:.2f} GB ({args.layers} layers of D=2048, 8 experts of F=2048, "
        f"V=32000), on {os.cpu_count()} CPUs, warm page cache; medians of 3",
        "",
        f"checkpoints.save, record included           {t_save:6.2f} s",
        f"stored bytes read again + SHA-256            {t_record:6.2f} s  ({gb / t_record:.2f} GB/s)",
        "  (what the record adds to a save, and what a check costs where it cannot hash the",
        "  values just loaded: converting back to HF, loading into another dtype, several processes)",
        f"checkpoints.load(path, verify=False)         {t_plain:6.2f} s",
        f"checkpoints.load(path), checked (default)    {t_checked:6.2f} s",
        "",
        f"checking adds {t_checked - t_plain:.2f} s to a load ({t_checked / t_plain:.2f}x), "
        f"{(t_checked - t_plain) / gb:.2f} s per GB",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
