"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

Every write goes to ``<name>.<pid>.tmp`` in the target's folder, is flushed to disk and renamed
over the target. A kill leaves at most a stale temporary file, which the next run removes
(:func:`remove_stale_temporaries`); the process id in its name keeps runs that share a folder
from removing each other's files while they are being written.

Test hook: ``INCSEG_KILL_AT_WRITE=n`` kills the process (SIGKILL) at its n-th write boundary.
Each write has two: after the temporary file is written, and after the rename. The crash-safety
test (tests/test_crash_safety.py) kills the trainer at each one in turn.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

KILL_VARIABLE = "INCSEG_KILL_AT_WRITE"
_TEMPORARY = re.compile(r"\.(\d+)\.tmp$")
_boundaries_passed = 0


def _write_boundary() -> None:
    global _boundaries_passed
    target = os.environ.get(KILL_VARIABLE)
    if not target:
        return
    _boundaries_passed += 1
    if _boundaries_passed == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_atomic(path, chunks) -> None:
    """Write the bytes (or text) ``chunks``, one object or a list, to ``path`` atomically."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks if isinstance(chunks, (list, tuple)) else [chunks]:
                f.write(chunk.encode() if isinstance(chunk, str) else chunk)
            f.flush()
            os.fsync(f.fileno())  # after a power cut the rename never points at unwritten data
    except BaseException:  # e.g. a full disk: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    _write_boundary()
    os.replace(tmp, path)
    _write_boundary()


def refresh_file(path, data: bytes | str) -> None:
    """``write_atomic`` unless ``path`` already holds ``data`` (reports rewritten on every run)."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == data:
        return
    write_atomic(path, data)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder) -> None:
    """Remove the temporary files in ``folder`` whose writing process is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _TEMPORARY.search(path.name)
        if match and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
