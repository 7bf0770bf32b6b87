"""The command lines answer before JAX loads: `--help` and a bad flag import nothing heavy
(experiments/cli_startup.py measures the time that saves), every usage line reads
`python -m MODULE`, and the flags' choices are the names the packages hold."""
import json
import os
import subprocess
import sys
from pathlib import Path

import model.config
import sharding
from experiments import cli
from experiments.cli_startup import COMMANDS

REPO = Path(__file__).resolve().parents[1]

# Runs each command's --help in one fresh process, in turn; says which one loaded JAX first.
PROBE = """
import contextlib, io, json, runpy, sys
out = {}
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    out[name] = {"help": text.getvalue(), "jax": "jax" in sys.modules}
print(json.dumps(out))
"""


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_help_imports_no_jax_and_names_the_module():
    probe = run("-c", PROBE, *COMMANDS)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert [m for m in COMMANDS if seen[m]["jax"]] == []
    for m in COMMANDS:
        assert seen[m]["help"].startswith(f"usage: python -m {m} "), (m, seen[m]["help"][:80])


def test_a_bad_flag_is_one_error_line():
    for args, says in [(["--preset", "llama"], "argument --preset: invalid choice: 'llama'"),
                       (["--batch", "0"], "--batch must be at least 1, got 0")]:
        r = run("-m", "experiments.plan", *args)
        assert r.returncode != 0 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr


def test_choices_are_the_packages_names():
    assert sorted(cli.PRESETS) == sorted(model.config.PRESETS)
    assert sorted(cli.STRATEGIES) == sorted(sharding.RULES)
