"""The quickstart run again after a kill resumes where it stopped; it never takes over or deletes
a directory that is not its own."""
import json
import subprocess
import sys

import pytest

from experiments import quickstart
from tests.runs import cached_env, kill_after_step
from training import read_metrics


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
