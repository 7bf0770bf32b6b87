"""The README's main job, `python -m experiments.quickstart`: its real code path for a few steps
(data from the stdlib, training, the checkpoint reloaded and exported, a completion); run again
after a kill it resumes where it stopped, and it never takes over or deletes a directory that is
not its own."""
import json
import subprocess
import sys

import pytest

import checkpoints
from experiments import quickstart
from tests.runs import cached_env, kill_after_step
from training import byte_tokenizer, read_metrics


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    quickstart.main(["--out", str(out), "--steps", "8", "--max-new-tokens", "16"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 9))
    assert history[-1]["ce"] < history[0]["ce"]                      # it learned something
    assert summary["completion"].startswith(quickstart.PROMPT)
    assert len(summary["completion"]) > len(quickstart.PROMPT)
    assert (out / "loss.png").stat().st_size > 0
    cfg, _ = checkpoints.load(out / "model")                           # the exported checkpoint
    assert cfg == quickstart.quickstart_config(byte_tokenizer()).replace(
        param_dtype=cfg.param_dtype)
    assert "wall time" in capsys.readouterr().out


def _cmd(out):
    return [sys.executable, "-m", "experiments.quickstart", "--out", str(out), "--steps", "12",
            "--save-every", "4", "--max-new-tokens", "4"]


@pytest.mark.slow
def test_rerun_after_a_kill_resumes(tmp_path):
    env = cached_env(tmp_path)
    out = tmp_path / "qs"
    kill_after_step(_cmd(out), env, out, 6)
    rerun = subprocess.run(_cmd(out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {out} from step 4" in rerun.stderr or \
        f"resuming {out} from step 8" in rerun.stderr, rerun.stderr
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 13))
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert (out / "model" / "checkpoint.json").is_file()


def test_a_directory_it_did_not_make_is_refused_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not a quickstart run"):
        quickstart.main(["--out", str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("left", [[], [quickstart.MARKER]],
                         ids=["killed_before_the_marker", "killed_before_any_metrics"])
def test_what_an_early_kill_leaves_is_taken_up(tmp_path, left):
    out = tmp_path / "qs"
    out.mkdir()
    for name in left:
        (out / name).write_text("{}")
    quickstart.claim_out(str(out), {"steps": 3})
    assert json.loads((out / quickstart.MARKER).read_text()) == {"steps": 3}


def test_the_loss_against_the_entropy_reads_right_both_ways():
    # a short run ends above the byte unigram entropy: it used to print "-2.96 bits/byte below"
    assert quickstart.versus_entropy(7.5, 4.54) == (
        "2.96 bits/byte above the byte unigram entropy of the corpus, 4.540: too few steps to "
        "learn even how often each byte occurs")
    assert quickstart.versus_entropy(2.08, 4.54) == (
        "2.46 bits/byte below the byte unigram entropy of the corpus, 4.540 (train loss = 46% of "
        "it)")
