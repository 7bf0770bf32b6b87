"""Failing cleanly: one error type for bad checkpoints; output that exists only when complete."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint we cannot read or write; the message is one line naming the file or tensor."""


@contextlib.contextmanager
def staged_dir(dst: str | os.PathLike):
    """Yield an empty temporary directory beside `dst`; rename it to `dst` if the body succeeds.

    Beside, not in /tmp: the final rename must stay on one filesystem to be atomic and cheap, and
    a crash leaves a visibly temporary `.DST.tmp-*` rather than a plausible-looking half checkpoint.
    One writer at a time holds `.DST.lock` (an flock, released by the kernel however the writer
    dies): a second one is refused at the start, and the holder removes the `.DST.tmp-*` that
    writers killed earlier left behind. A full disk is one CheckpointError.
    """
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; refusing to overwrite it")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent} does not exist (parent directory of {dst.name})")
    with _writer_lock(dst):
        if dst.exists():  # finished by the writer that held the lock before us
            raise CheckpointError(f"{dst} already exists; refusing to overwrite it")
        for left in glob.glob(glob.escape(str(dst.parent / f".{dst.name}.tmp-")) + "*"):
            shutil.rmtree(left, ignore_errors=True)
            warnings.warn(f"removed {left}, left by an interrupted write of {dst}", stacklevel=3)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        except OSError as e:
            raise CheckpointError(f"cannot write in {dst.parent} ({e.strerror})") from None
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        try:
            yield tmp
            os.rename(tmp, dst)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                free = shutil.disk_usage(dst.parent).free
                raise CheckpointError(f"no space left on the device of {dst.parent} while writing "
                                      f"{dst.name} ({free / 2**20:.1f} MiB free with the partial "
                                      "output removed)") from None
            raise


@contextlib.contextmanager
def _writer_lock(dst: Path):
    lock = dst.parent / f".{dst.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot write in {dst.parent} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"another process (pid {pid}) is writing {dst}; wait for it "
                                  "or choose another destination") from None
        # The holder before us unlinks the file as it lets go: a lock on that file locks nothing.
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.unlink(lock)  # while still held, so that whoever waits finds `dst` (or nothing)
        os.close(fd)


def _disk_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is in the exception chain (TensorStore reports it in a ValueError's text)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def quiet_orbax():
    """Orbax's worker threads log each failure with its traceback (hundreds of lines for one full
    disk) before the caller gets the same exception; the caller reports it, so mute the log."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
