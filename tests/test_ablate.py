"""Every ablation end to end at `--size smoke` (its variants trained and evaluated, its results
written: the table's structure, and that each variant trained: its loss fell), one of them with
two seeds (the spread, the findings judged; started again it reads every run back), the
evaluations command line on one of its runs, and the command lines' bad input.

All the smoke runs of a session share one runs directory, whichever xdist worker runs them, so
that a run two ablations share (their reference) trains once: the second waits on its lock and
reads it back (experiments/ablation_runs.py)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from experiments import ablate
from experiments.ablation_report import METRICS
from experiments.ablations import ABLATIONS, SIZES, base_config
from tests.runs import REPO
from training import byte_tokenizer

SEEDS = 2
NAME = "temperature"                  # the one run with SEEDS seeds: every evaluation is in it
MOE_ONLY = {"entropy", "dead", "max_load"}  # undefined ("—", null) for a variant without experts
NUMBER = r"-?[\d,.]+(e-?\d+)?M?"
RUN_LINE = re.compile(r"^\[\d+/\d+\] .+ seed \d+: (step \d+/\d+|no steps)", re.M)


def _ablate(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.ablate", *args], env=env,
                          capture_output=True, text=True, cwd=REPO, **kw)


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    out = root / "ablation_runs"
    out.mkdir(exist_ok=True)
    return out


def _smoke(name, seeds, runs, results):
    done = _ablate(name, "--size", "smoke", "--seeds", str(seeds), "--out", str(runs),
                   "--results", str(results))
    assert done.returncode == 0, done.stderr
    return done.stderr


def _no_nan(text):
    raise AssertionError(f"{text} in a results file: not JSON (undefined values are null)")


def check_results(name, results, seeds, log):
    """The results of `name` in `results`: a line per run, the command, the table (every variant,
    every metric, the mean and with several seeds the spread), a finding per variant, the figure;
    the JSON record (strict JSON, every variant's every metric) says each run's loss fell."""
    a = ABLATIONS[name]
    base = base_config(SIZES["smoke"], byte_tokenizer())
    moe = {v.name: bool(v.config(base).text.moe_layers) for v in a.variants}
    assert len(RUN_LINE.findall(log)) == seeds * len(a.variants), log
    md = (results / f"{name}.md").read_text()
    assert f"`python -m experiments.ablate {name} --size smoke --seeds {seeds}`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == "| variant | " + " | ".join(METRICS[m].label for m in a.metrics) + " |"
    assert [r.split(" | ")[0][2:] for r in body] == \
        [f"{v.name} (reference)" if i == 0 else v.name for i, v in enumerate(a.variants)]
    for v, r in zip(a.variants, body):
        cells = r.strip("| ").split(" | ")[1:]
        assert len(cells) == len(a.metrics), r
        for m, c in zip(a.metrics, cells):
            if m in MOE_ONLY and not moe[v.name]:
                assert c == "—", (v.name, m, c)
                continue
            spread = seeds > 1 and METRICS[m].fmt != "M"
            assert re.fullmatch(NUMBER + (f" ± {NUMBER}" if spread else ""), c), (v.name, m, c)
    findings = re.findall(r"^- \*\*.*$", md, re.M)
    assert len(findings) == len(a.variants) - 1                   # a finding per variant
    assert all(("not judged" in f) == (seeds == 1) for f in findings), findings
    if "rise_16x" in a.metrics:
        assert md.count("from 1x to 16x:") == len(a.variants)     # and whether it holds its loss
    assert (results / f"{name}.png").stat().st_size > 10_000
    record = json.loads((results / f"{name}.json").read_text(), parse_constant=_no_nan)
    assert list(record["stats"]) == [v.name for v in a.variants]
    for v, stats in record["stats"].items():
        assert list(stats) == list(a.metrics)
        for m, s in stats.items():
            undefined = m in MOE_ONLY and not moe[v]
            assert s["n"] == (0 if undefined else seeds), (v, m, s)
            assert (s["mean"] is None) == undefined and (s["sd"] is None) == undefined, (v, m, s)
            assert undefined or math.isfinite(s["mean"])
    assert sorted((r["variant"], r["seed"]) for r in record["runs"]) == \
        sorted((v.name, s) for v in a.variants for s in range(seeds))
    for r in record["runs"]:  # each variant trained: its loss fell
        assert r["last_loss"] < r["first_loss"], r


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_ablation_runs_at_smoke_size_and_each_variant_trains(name, runs_dir, tmp_path):
    check_results(name, tmp_path, 1, _smoke(name, 1, runs_dir, tmp_path))


@pytest.fixture(scope="module")
def smoke(runs_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return results, _smoke(NAME, SEEDS, runs_dir, results)


def test_with_seeds_the_table_has_the_spread_and_judges_each_variant(smoke):
    results, log = smoke
    check_results(NAME, results, SEEDS, log)


def test_started_again_it_reads_every_run_back(smoke, runs_dir):
    results, _ = smoke
    log = _smoke(NAME, SEEDS, runs_dir, results)
    lines = [line for line in log.splitlines() if RUN_LINE.match(line)]
    assert len(lines) == SEEDS * len(ABLATIONS[NAME].variants)
    assert all(line.endswith("(done earlier)") for line in lines), lines


def test_evals_command_line_on_a_run(smoke, tmp_path, capsys):
    from experiments import evals
    results, _ = smoke
    run = json.loads((results / f"{NAME}.json").read_text())["runs"][0]["dir"]
    # Retrieval at lengths and depths of one's choosing; held-out loss at the run's length.
    evals.main(["retrieval", "--ckpt", run, "--lengths", "40,72", "--depths", "0,1",
                "--per-depth", "2", "--batch", "4"])
    r = json.loads(capsys.readouterr().out)
    assert r["seq"] == 32 and r["retrieval"]["lengths"] == [40, 72]
    assert r["retrieval"]["depths"] == [0.0, 1.0] and len(r["retrieval"]["accuracy"]) == 2
    assert all(len(d) == 2 and all(0 <= x <= 1 for x in d) for d in r["retrieval"]["by_depth"])
    assert r["stability"]["max_grad_norm"] > 0 and r["tokens_per_s"] > 0
    evals.main(["heldout", "--ckpt", run, "--rows", "4", "--json", str(tmp_path / "heldout.json")])
    h = json.loads((tmp_path / "heldout.json").read_text())["heldout"]
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
