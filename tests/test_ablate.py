"""An ablation end to end at `--size smoke` (its variants trained and evaluated, results written;
started again it reads every run back), the evaluations command line on one of its runs, and the
command lines' bad input. Every ablation end to end (`python -m experiments.ablate all --size
smoke`) compiles twenty model configs, minutes on the 2-core machine, more than the suite can
spend: here, the ablation that exercises every evaluation (temperature: the passkey task in its
data, loss by position, retrieval, held-out loss and MoE health, stability), and for the others
that each variant is a valid config (tests/test_ablation_parts.py)."""
import json
import os
import re
import subprocess
import sys

import pytest

from experiments import ablate
from experiments.ablation_report import METRICS
from experiments.ablations import ABLATIONS
from tests.runs import REPO

SEEDS = 2


def _ablate(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.ablate", *args], env=env,
                          capture_output=True, text=True, cwd=REPO, **kw)


NAME = "temperature"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    done = _ablate(NAME, "--size", "smoke", "--seeds", str(SEEDS), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done.stderr


def test_an_ablation_runs_end_to_end_and_every_variant_trains(smoke):
    out, log = smoke
    a = ABLATIONS[NAME]
    assert len(re.findall(r"^\[\d+/\d+\] ", log, re.M)) == SEEDS * len(a.variants)  # a line per run
    md = (out / "results" / f"{NAME}.md").read_text()
    assert f"`python -m experiments.ablate {NAME} --size smoke --seeds {SEEDS}`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == "| variant | " + " | ".join(METRICS[m].label for m in a.metrics) + " |"
    assert [r.split(" | ")[0][2:] for r in body] == \
        [f"{v.name} (reference)" if i == 0 else v.name for i, v in enumerate(a.variants)]
    cell = re.compile(r"^-?[\d,.]+(e-?\d+)? ± [\d,.]+(e-?\d+)?$")
    for r in body:
        cells = r.strip("| ").split(" | ")[1:]
        assert len(cells) == len(a.metrics) and all(cell.match(c) for c in cells), r
    assert md.count("- **") == len(a.variants) - 1          # a finding per variant
    assert md.count("from 1x to 16x:") == len(a.variants)   # and whether it holds its loss
    assert (out / "results" / f"{NAME}.png").stat().st_size > 10_000
    record = json.loads((out / "results" / f"{NAME}.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in record["runs"]) == \
        sorted((v.name, s) for v in a.variants for s in range(SEEDS))
    for r in record["runs"]:  # each variant trained: its loss fell
        assert r["last_loss"] < r["first_loss"], r


def test_started_again_it_reads_every_run_back(smoke):
    out, _ = smoke
    again = _ablate(NAME, "--size", "smoke", "--seeds", str(SEEDS), "--out", str(out))
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == SEEDS * len(ABLATIONS[NAME].variants)
    assert all(line.endswith("(done earlier)") for line in lines), again.stderr


def test_evals_command_line_on_a_run(smoke, capsys):
    from experiments import evals
    out, _ = smoke
    run = json.loads((out / "results" / f"{NAME}.json").read_text())["runs"][0]["dir"]
    # Retrieval at lengths and depths of one's choosing; held-out loss at the run's length.
    evals.main(["retrieval", "--ckpt", run, "--lengths", "40,72", "--depths", "0,1",
                "--per-depth", "2", "--batch", "4"])
    r = json.loads(capsys.readouterr().out)
    assert r["seq"] == 32 and r["retrieval"]["lengths"] == [40, 72]
    assert r["retrieval"]["depths"] == [0.0, 1.0] and len(r["retrieval"]["accuracy"]) == 2
    assert all(len(d) == 2 and all(0 <= x <= 1 for x in d) for d in r["retrieval"]["by_depth"])
    assert r["stability"]["max_grad_norm"] > 0 and r["tokens_per_s"] > 0
    evals.main(["heldout", "--ckpt", run, "--rows", "4", "--json", str(out / "heldout.json")])
    h = json.loads((out / "heldout.json").read_text())["heldout"]
    assert 0 < h["bits_per_byte"] < 9 and len(h["load"]) == 2 and 0 < h["balance_entropy"] <= 1


@pytest.mark.parametrize("args, message", [
    (["retrieval", "--ckpt", "/nonexistent"], "--ckpt /nonexistent: not a checkpoint directory"),
    (["retrieval", "--ckpt", "."], "is not a training run: give its training length, --seq"),
    (["retrieval", "--ckpt", ".", "--lengths", "1,8"], "--lengths must be context lengths of"),
    (["retrieval", "--ckpt", ".", "--seq", "8", "--depths", "0,2"], "--depths must be fractions"),
    (["heldout", "--ckpt", ".", "--seq", "8", "--batch", "0"], "--batch must be at least 1"),
])
def test_evals_bad_input_is_one_clear_error(args, message, capsys):
    from experiments import evals
    with pytest.raises(SystemExit) as e:
        evals.main(args)
    assert message in str(e.value.code) and "Traceback" not in str(e.value.code)


@pytest.mark.parametrize("args, message", [
    (["bogus"], "unknown ablation 'bogus'; choose from"),
    ([], "name an ablation"),
    (["irope", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["irope", "--steps", "-3"], "--steps must be at least 1, got -3"),
    (["irope", "--size", "huge"], "invalid choice: 'huge'"),
])
def test_bad_input_is_one_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        ablate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_list_names_every_ablation_and_variant(capsys):
    ablate.main(["--list"])
    text = capsys.readouterr().out
    for a in ABLATIONS.values():
        assert f"{a.name}: {a.question}" in text
        for v in a.variants:
            assert f"    {v.name}" in text
    assert "all_rope: nope_layers=(), attention_chunk_size=None" in text
