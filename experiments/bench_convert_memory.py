"""Peak resident memory of `python -m checkpoints.convert` at two checkpoint sizes.

    python -m experiments.bench_convert_memory [--layers 1 8 16] [--tmp DIR] [--quantize RECIPE]

Builds synthetic bf16 HF checkpoints (random weights, Scout-like layers with large widths, written
in 256 MB safetensors shards one shard at a time), converts each HF -> Orbax and back with the
CLI in a subprocess, and reads that subprocess's peak RSS (the kernel's high-water mark, via GNU
time; mapped file pages count). If conversion streams, peak RSS stays flat as the checkpoint grows.
With --quantize RECIPE the HF -> Orbax conversion quantizes (`convert --quantize RECIPE`) and
there is no way back (a quantized checkpoint is not converted to HF).
Writes experiments/results/convert_memory[_RECIPE].txt; deletes its temporary checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import cli

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 256 << 20


def synthetic_config(layers: int):
    """~248 MB of bf16 per layer (8 experts of 2048 x 2048) plus 262 MB of embedding and head."""
    from model.config import Config, TextConfig, every
    return Config(vision=None, text=TextConfig(
        vocab_size=32000, hidden_size=2048, num_layers=layers, num_heads=16, num_kv_heads=4,
        head_dim=128, intermediate_size=2048, intermediate_size_mlp=4096, num_experts=8,
        moe_layers=tuple(range(layers)), nope_layers=every(4, layers, 3), rope_scaling=None))


def write_synthetic_hf(dst: Path, cfg, seed: int = 0) -> int:
    """An HF directory for `cfg`, one shard in memory at a time; returns its tensor bytes."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from checkpoints import keys
    from model.config import to_hf
    dst.mkdir()
    rng = np.random.default_rng(seed)
    shards, size = [[]], 0
    for key in keys.hf_keys(cfg, "causal_lm"):
        n = 2 * math.prod(key.hf_shape)
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {k.hf: (0.02 * rng.standard_normal(k.hf_shape, np.float32))
                .astype(ml_dtypes.bfloat16) for k in shard}
        save_file(data, str(dst / name), metadata={"format": "pt"})
        weight_map |= {k.hf: name for k in shard}
    total = sum(2 * math.prod(k.hf_shape) for shard in shards for k in shard)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(to_hf(cfg)))
    return total


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of `cmd`, which must succeed.

    GNU time reports the kernel's high-water mark for the command alone. Waiting on our own
    child would not do: a child forked from this (large) process inherits its resident pages
    into the mark before exec. Without GNU time, poll the command's RSS instead.
    """
    start = time.time()
    if Path("/usr/bin/time").exists():
        run = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=REPO, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
        return int(run.stderr.split()[-1]) * 1024, time.time() - start  # kilobytes
    import psutil  # only this fallback needs it

    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, proc.memory_info().rss)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return peak, time.time() - start


def main():
    p = cli.parser(__spec__.name, __doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--tmp", type=Path, default=REPO / "experiments" / "results" / "tmp")
    p.add_argument("--quantize", metavar="RECIPE", help="convert with --quantize RECIPE")
    args = p.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        work = Path(tempfile.mkdtemp(dir=args.tmp))
        try:
            size = write_synthetic_hf(work / "hf", synthetic_config(layers))
            convert = [sys.executable, "-m", "checkpoints.convert"]
            quantize = ["--quantize", args.quantize] if args.quantize else []
            to_orbax = peak_rss(convert + [str(work / "hf"), str(work / "orbax"), *quantize])
            to_hf = (0, 0.0) if args.quantize else peak_rss(
                convert + [str(work / "orbax"), str(work / "back"), "--to", "hf"])
            rows.append((layers, size, to_orbax, to_hf))
            back = "" if args.quantize else (f", Orbax->HF peak RSS {to_hf[0] / 1e6:.0f} MB "
                                             f"({to_hf[1]:.0f} s)")
            print(f"{layers} layers, {size / 1e9:.2f} GB: HF->Orbax peak RSS "
                  f"{to_orbax[0] / 1e6:.0f} MB ({to_orbax[1]:.0f} s){back}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):  # ours when empty; a shared --tmp is not
        args.tmp.rmdir()
    small, big = rows[0], rows[-1]
    command = f"python -m experiments.bench_convert_memory {' '.join(sys.argv[1:])}".strip()
    how = ("max resident set size from /usr/bin/time (kernel high-water mark)"
           if Path("/usr/bin/time").exists() else "psutil polling every 20 ms")
    lines = [f"command: {command}",
             "synthetic bf16 HF checkpoints (D=2048, 8 experts of F=2048, V=32000), converted by "
             f"`python -m checkpoints.convert {' '.join(quantize)}` in a subprocess on "
             f"{os.cpu_count()} CPUs; "
             f"peak RSS = {how}",
             "", f"{'layers':>6} {'checkpoint':>11} {'HF->Orbax RSS':>14} {'time':>6}"
             + ("" if args.quantize else f" {'Orbax->HF RSS':>14} {'time':>6}")]
    for layers, size, (o_rss, o_s), (h_rss, h_s) in rows:
        back = "" if args.quantize else f" {h_rss / 1e6:>12.0f}MB {h_s:>5.0f}s"
        lines.append(f"{layers:>6} {size / 1e9:>9.2f}GB {o_rss / 1e6:>12.0f}MB {o_s:>5.0f}s{back}")
    back = "" if args.quantize else f", {big[3][0] / small[3][0]:.2f}x (Orbax->HF)"
    lines += ["", f"checkpoint grew {big[1] / small[1]:.2f}x; peak RSS grew "
              f"{big[2][0] / small[2][0]:.2f}x (HF->Orbax){back}"]
    out = REPO / "experiments" / "results" / (
        f"convert_memory{'_' + args.quantize if args.quantize else ''}.txt")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[3:]))
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
