"""Failing cleanly: one error type for bad checkpoints; output that exists only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint we cannot read or write; the message is one line naming the file or tensor."""


@contextlib.contextmanager
def staged_dir(dst: str | os.PathLike):
    """Yield an empty temporary directory beside `dst`; rename it to `dst` if the body succeeds.

    Beside, not in /tmp: the final rename must stay on one filesystem to be atomic and cheap, and
    a crash leaves a visibly temporary `.DST.tmp-*` rather than a plausible-looking half checkpoint.
    """
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; refusing to overwrite it")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent} does not exist (parent directory of {dst.name})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
