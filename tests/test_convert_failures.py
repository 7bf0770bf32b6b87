"""Conversion when things go wrong around it: a writer killed mid-way, two writers at once, a full
disk, NaN weights in the source."""
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints.convert import main
from experiments import generate
from tests.hf_models import make_hf_text_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path, _ = make_hf_text_model(tmp_path_factory.mktemp("src"), name="hf", num_hidden_layers=5)
    return path


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next(src, tmp_path, capsys):
    # A conversion whose every read takes a while, so that it is surely killed mid-write.
    slow = textwrap.dedent(f"""
        import time, checkpoints.hf as hf
        read = hf.HFCheckpoint.read
        hf.HFCheckpoint.read = lambda *a: (time.sleep(0.05), read(*a))[1]
        from checkpoints.convert import main
        main([{str(src)!r}, {str(tmp_path / 'out')!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", slow], env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/params*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (left,) = tmp_path.glob(".out.tmp-*")
    assert main([str(src), str(tmp_path / "out")]) == 0
    assert f"warning: removed {left}, left by an interrupted write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no leftover, no lock file


def test_a_second_writer_is_refused_at_the_start(src, tmp_path, capsys):
    with open(tmp_path / ".out.lock", "w") as lock:  # what a running conversion holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        assert main([str(src), str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err == f"error: another process (pid 4242) is writing {tmp_path / 'out'}; wait " \
                      "for it or choose another destination\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


def test_a_full_disk_is_one_line_and_leaves_nothing(src, tmp_path):
    """On a 300 kB tmpfs (mounted in a user namespace of its own: no root needed)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small filesystem")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=300k tmpfs {disk} || exit 99; "
              f"{sys.executable} -m checkpoints.convert {src} {disk}/out; echo rc=$?; ls -A {disk}")
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True,
                         text=True)
    if run.returncode == 99 or "unshare failed" in run.stderr:
        pytest.skip(f"cannot mount a filesystem here: {run.stderr.strip()}")
    assert run.stdout.split() == ["rc=1"], run.stdout  # and the disk is empty again
    lines = [x for x in run.stderr.splitlines() if "orbax:" not in x and x.strip()]  # no bars
    assert len(lines) == 1 and lines[0].startswith(
        f"error: no space left on the device of {disk} while writing out ("), run.stderr


def test_nan_weights_are_named_at_conversion_and_stop_generation(src, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    t = load_file(bad / "model.safetensors")
    name = "model.layers.2.self_attn.q_proj.weight"
    t[name] = t[name].copy()
    t[name][0, :3] = [np.nan, np.inf, -np.inf]
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main([str(bad), str(tmp_path / "orbax")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {bad}: 1 tensor(s) hold NaN or inf values (count in brackets): {name} (3)" \
        in err, err
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(tmp_path / "orbax"), "--prompt-ids", "5,6",
                       "--max-new-tokens", "4"])
    assert e.value.code == 1
    assert "error: the model's logits after the prompt are NaN or infinite" in capsys.readouterr().err
