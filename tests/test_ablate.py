"""The ablations end to end at `--size smoke` (one ablation's variants trained and evaluated,
results written; started again it resumes; every ablation end to end is the slow test), the
evaluations command line on one of its runs, and the command lines' bad input."""
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


def _run_all(out, names):
    done = _ablate(*names, "--size", "smoke", "--seeds", str(SEEDS), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """irope (the passkey task in its data; positions and retrieval) and interleave (MoE health,
    stability): every metric source, seven of the twenty model configs of all the ablations."""
    return _run_all(tmp_path_factory.mktemp("ablations"), ["irope", "interleave"])


def _check_results(out, log, names):
    runs = len(re.findall(r"^\[\d+/\d+\] ", log, re.M))
    assert runs == SEEDS * sum(len(ABLATIONS[n].variants) for n in names)  # a line per run
    for name in names:
        a = ABLATIONS[name]
        md = (out / "results" / f"{name}.md").read_text()
        assert f"`python -m experiments.ablate {name} --size smoke --seeds {SEEDS}`" in md
        rows = [line for line in md.splitlines() if line.startswith("| ")]
        header, body = rows[0], rows[1:]
        assert header == "| variant | " + " | ".join(METRICS[m].label for m in a.metrics) + " |"
        assert [r.split(" | ")[0][2:] for r in body] == \
            [f"{v.name} (reference)" if i == 0 else v.name for i, v in enumerate(a.variants)]
        cell = re.compile(r"^(—|-?[\d,.]+(e-?\d+)? ± [\d,.]+(e-?\d+)?|[\d.]+M)$")
        for r in body:
            cells = r.strip("| ").split(" | ")[1:]
            assert len(cells) == len(a.metrics) and all(cell.match(c) for c in cells), r
        assert md.count("- **") == len(a.variants) - 1          # a finding per variant
        assert (out / "results" / f"{name}.png").stat().st_size > 10_000
        record = json.loads((out / "results" / f"{name}.json").read_text())
        assert sorted((r["variant"], r["seed"]) for r in record["runs"]) == \
            sorted((v.name, s) for v in a.variants for s in range(SEEDS))
        for r in record["runs"]:  # each variant trained: its loss fell
            assert "diverged_at" in r or r["last_loss"] < r["first_loss"], (name, r)


def test_ablations_run_end_to_end_and_every_variant_trains(smoke):
    _check_results(*smoke, ["irope", "interleave"])
    md = (smoke[0] / "results" / "irope.md").read_text()
    assert "Length generalisation" in md and md.count("from 1x to 16x:") == 4


@pytest.mark.slow
def test_every_ablation_runs_end_to_end(tmp_path):
    """Minutes on the 2-core machine (README, Ablations): twenty configs compile."""
    _check_results(*_run_all(tmp_path, ["all"]), sorted(ABLATIONS))


def test_started_again_it_reads_every_run_back(smoke):
    out, _ = smoke
    again = _ablate("interleave", "--size", "smoke", "--seeds", str(SEEDS), "--out", str(out))
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == SEEDS * len(ABLATIONS["interleave"].variants)
    assert all(line.endswith("(done earlier)") for line in lines), again.stderr


def _evals(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    return subprocess.run([sys.executable, "-m", "experiments.evals", *args], env=env,
                          capture_output=True, text=True, cwd=REPO)


def test_evals_command_line_on_a_run(smoke):
    out, _ = smoke
    record = json.loads((out / "results" / "irope.json").read_text())
    run = record["runs"][0]["dir"]
    done = _evals("all", "--ckpt", run, "--rows", "4", "--long-rows", "2", "--per-depth", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["seq"] == 32 and 0 < results["heldout"]["bits_per_byte"] < 9
    assert set(results["retrieval"]) >= {"1x", "2x", "4x", "8x", "16x", "by_depth"}
    assert set(results["positions"]) >= {"1x", "16x", "curve"}
    assert results["stability"]["max_grad_norm"] > 0 and results["tokens_per_s"] > 0
    # Retrieval alone, at lengths and depths of one's choosing (no training length needed).
    done = _evals("retrieval", "--ckpt", run, "--lengths", "40,72", "--depths", "0,1",
                  "--per-depth", "2", "--batch", "4")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)["retrieval"]
    assert r["lengths"] == [40, 72] and r["depths"] == [0.0, 1.0]
    assert len(r["accuracy"]) == 2 and all(len(d) == 2 for d in r["by_depth"])


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
