"""Training runs in subprocesses, for the tests that kill them and run them again."""
import os
import signal
import subprocess
import time
from pathlib import Path

from training import read_metrics

REPO = Path(__file__).resolve().parents[1]


def cached_env(tmp_path: Path) -> dict:
    """The environment of a run; a compilation cache shared by the runs: only the first compiles."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(REPO)}


def kill_after_step(cmd: list[str], env: dict, out: Path, step: int, timeout: float = 600):
    """Start `cmd` and SIGKILL it once OUT/metrics.jsonl records `step`."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while max((m["step"] for m in read_metrics(out)), default=0) < step:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
