"""Run ablations of Llama 4's design choices: every variant x seed trained identically, evaluated,
summarised with the seed spread.

    python -m experiments.ablate NAME [NAME ...] [--seeds N] [--steps N] [--size smoke|default]
    python -m experiments.ablate all                # every ablation, one after another
    python -m experiments.ablate --list             # the ablations and their variants

The ablations are defined in experiments/ablations.py (how to add one: there and the README).
Training data: the quickstart's (the standard library's own sources, bytes), plus the generated
passkey task where an ablation asks for it; evaluation on the held-out files (experiments/evals.py).

Each run trains in OUT/runs/<hash>, the hash of everything that determines it (model, optimiser,
data, seed, evaluation settings), so a run shared by two ablations (their common reference) is
trained once, and an ablation stopped and started again resumes: finished runs are read back,
an unfinished one resumes from its latest checkpoint. One line per run reports it. Results go to
RESULTS/NAME.md (the command, the table, the findings), NAME.png and NAME.json; RESULTS defaults
to experiments/results/ablations, or OUT/results for --size smoke.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from .ablations import ABLATIONS, SIZES

DEFAULT_OUT = "runs/ablations"
DEFAULT_RESULTS = "experiments/results/ablations"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"of {sorted(ABLATIONS)}, or all")
    ap.add_argument("--list", action="store_true", help="list the ablations and exit")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per variant (0 .. N-1)")
    ap.add_argument("--steps", type=int, help="training steps per run (default: the size's)")
    ap.add_argument("--size", default="default", choices=sorted(SIZES))
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the runs train")
    ap.add_argument("--results", help="where the results go (default: see above)")
    return ap


def describe(size, names=None) -> str:
    """Each ablation (or those named) and its variants, as the fields each changes in the base
    model (and the optimiser) at this size."""
    from training import byte_tokenizer
    from .ablations import base_config
    base, optim = base_config(size, byte_tokenizer()), size.optim_config()
    lines = [f"(fields as at --size {size.name})"]
    for a in (ABLATIONS[n] for n in names or ABLATIONS):
        lines.append(f"{a.name}: {a.question}")
        for i, v in enumerate(a.variants):
            diff = {**_changed(base.text, v.config(base).text),
                    **_changed(optim, v.optim_config(optim), "optim.")}
            what = ", ".join(f"{k}={val!r}" for k, val in diff.items()) or "the base config"
            lines.append(f"    {v.name}{' (reference)' if i == 0 else ''}: {what}")
    return "\n".join(lines)


def _changed(a, b, prefix="") -> dict:
    return {prefix + f.name: getattr(b, f.name) for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)}


def parse(argv) -> tuple[argparse.Namespace, list[str]]:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        return args, []
    names = sorted(ABLATIONS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in ABLATIONS]
    if not names:
        ap.error(f"name an ablation (of {sorted(ABLATIONS)}, or all), or pass --list")
    if unknown:
        ap.error(f"unknown ablation {', '.join(map(repr, unknown))}; choose from "
                 f"{sorted(ABLATIONS)} (or all)")
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    return args, list(dict.fromkeys(names))


def command(name: str, args) -> str:
    """The command that makes NAME's results file (as `all` would, one ablation alone)."""
    cmd = f"python -m experiments.ablate {name} --size {args.size} --seeds {args.seeds}"
    return cmd + (f" --steps {args.steps}" if args.steps else "")


def main(argv=None):
    args, names = parse(argv)
    if args.list:
        print(describe(SIZES[args.size]))
        return
    size = SIZES[args.size]
    if size.xla_flags:  # read when the backend starts, which nothing has asked for yet
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {size.xla_flags}".strip()
    # Seeds after the first find each compiled program on disk (only the first variant's seed
    # compiles); set before JAX compiles anything.
    import jax
    jax.config.update("jax_compilation_cache_dir",
                      os.path.abspath(os.path.join(args.out, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from .ablation_runs import Runner
    from training import DataError
    results = args.results or (os.path.join(args.out, "results") if args.size == "smoke"
                               else DEFAULT_RESULTS)
    try:
        runner = Runner(size, args.steps, args.out)
        for name in names:
            t0 = time.time()
            runner.ablation(ABLATIONS[name], args.seeds, results, command(name, args))
            print(f"{name}: {time.time() - t0:.0f} s; results in {results}/{name}.md",
                  file=sys.stderr, flush=True)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
