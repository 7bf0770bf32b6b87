"""How fast each command line answers `--help`, against importing what it runs on.

    python -m experiments.cli_startup [--repeats 5]

Each command parses its arguments before importing JAX (experiments/cli.py), so `--help` costs a
Python start and argparse; the reference is a fresh process importing jax and the model package,
what every `--help` paid before. Prints, and writes experiments/results/cli_startup.txt: the
median wall time of each over fresh processes, and the ratio.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from experiments import cli

REPO = Path(__file__).resolve().parents[1]
# Every command line of the repository, as `python -m` runs it (colab/render.py is a script).
COMMANDS = ["checkpoints.convert", "experiments.generate", "experiments.train", "experiments.plan",
            "experiments.quickstart", "experiments.kv_memory", "experiments.bench_forward",
            "experiments.bench_generate", "experiments.bench_integrity",
            "experiments.bench_layouts", "experiments.bench_vision",
            "experiments.bench_convert_memory", "experiments.bench_quantized_accuracy",
            "experiments.cli_startup"]


def command_line(name: str) -> list[str]:
    if name.endswith(".py"):
        return [sys.executable, str(REPO / name)]
    return [sys.executable, "-m", name]


def seconds(cmd: list[str], repeats: int) -> float:
    """Median wall time of `cmd` in fresh processes, after one warm-up run (file caches)."""
    from experiments.timing import timed

    def once():
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return timed(once, repeats=repeats)[0]


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--repeats", type=int, default=5, help="processes per command (default: 5)")
    args = ap.parse_args()
    ref = seconds([sys.executable, "-c", "import jax, jax.numpy; import model, checkpoints"],
                  args.repeats)
    lines = [f"command: python -m experiments.cli_startup --repeats {args.repeats}",
             f"reference: a fresh process importing jax and model: {ref:.2f} s (median of "
             f"{args.repeats})", "", f"{'command':<52} {'--help s':>9} {'/ ref':>7}"]
    for name in COMMANDS + ["colab/render.py"]:
        t = seconds(command_line(name) + ["--help"], args.repeats)
        label = name if name.endswith(".py") else f"python -m {name}"
        lines.append(f"{label + ' --help':<52} {t:>9.2f} {t / ref:>7.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (REPO / "experiments" / "results" / "cli_startup.txt").write_text(text)


if __name__ == "__main__":
    main()
