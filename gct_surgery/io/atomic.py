"""Atomic file writes: a killed run never leaves a half-written output behind.

Every output is written to a temp file in the destination folder, flushed and
fsynced, then renamed over the destination with ``os.replace`` (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success fsync it and rename it over ``dest``.

    On any error the temp file is removed and ``dest`` keeps its previous content.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fault_before_rename(dest, tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


_writes: dict[str, int] = {}


def _fault_before_rename(dest: Path, tmp: Path) -> None:
    """Testing hook: ``GCT_SURGERY_FAULT=kill:during_save:NAME[:N]`` SIGKILLs this process
    during its N-th write (default 1st) of a file named NAME, with the temp file cut to
    half and not yet renamed: a crash mid-write, made deterministic for the tests
    (docs/reliability.md). Unset, it costs one environment lookup per write."""
    spec = os.environ.get("GCT_SURGERY_FAULT", "")
    if not spec.startswith("kill:during_save:"):
        return
    name, _, n = spec[len("kill:during_save:"):].partition(":")
    if name != dest.name:
        return
    _writes[name] = _writes.get(name, 0) + 1
    if _writes[name] == int(n or 1):
        os.truncate(tmp, tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (the directory entry lives in the parent)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
