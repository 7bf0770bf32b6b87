"""The quickstart run again after a kill resumes where it stopped; it never takes over or deletes
a directory that is not its own."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import quickstart
from training import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _cmd(out):
    return [sys.executable, "-m", "experiments.quickstart", "--out", str(out), "--steps", "12",
            "--save-every", "4", "--max-new-tokens", "4"]


def test_rerun_after_a_kill_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jc"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = tmp_path / "qs"
    proc = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while max((m["step"] for m in read_metrics(out)), default=0) < 6:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
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
