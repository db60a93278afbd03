"""One process per run folder: an advisory lock held for the whole run.

``finetune``, ``resume`` and a comparison take ``RUN/.gct-surgery.lock`` with
``flock`` before they read or write anything in the folder, and hold it to the end.
The kernel releases it when the process dies, however it dies, so a killed run never
leaves a stale lock. A forked DataLoader worker closes its inherited copy first thing
(``close_inherited``), so a worker outliving a killed run cannot hold the folder. A
second run or resume of the same folder is refused with one line naming the holder's
pid, and start-up clean-up (``remove_stale_temps``) only ever runs under the lock, so
it never touches a live run's files.

Under torchrun only rank 0 takes the lock (every rank works in the one folder).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..io.atomic import WriteError, make_folder
from .faults import RunError
from .outputs import COMPARISON_PLAN, SEED_PLAN
from .progress import STATE_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no lock, as before)
    fcntl = None  # type: ignore[assignment]

_logger = logging.getLogger(__name__)

LOCK_FILE = ".gct-surgery.lock"
_held: dict[str, int] = {}  # real path of each folder this process holds -> the lock's fd


def close_inherited() -> None:
    """In a forked child (a DataLoader worker): close the copies of the parent's lock
    files, so that only the parent holds its folders."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def hold(folder: str | os.PathLike, *, create: bool = True, what: str = "run") -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block. ``create``: make the folder (a new
    run); otherwise it must exist (a resume)."""
    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0 or fcntl is None:
        yield folder
        return
    if not create and not folder.is_dir():
        raise RunError(f"no run folder {folder}: nothing to resume (check the path)")
    make_folder(folder, f"{what} folder")
    key = os.path.realpath(folder)
    if key in _held:
        raise RunError(f"{folder} is already in use by this process; choose another --out")
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(f"could not lock the {what} folder {folder}: {e.strerror or e}; choose a "
                         "folder you can write to", path, e.strerror or str(e)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                _logger.warning("cannot lock %s (%s): a second run of this folder would not be "
                                "stopped", folder, e.strerror or e)  # a file system without locks
            else:
                raise RunError(f"{folder} is in use by {_holder(path)} (a {what} still writing "
                               f"there): wait for it to finish, stop it, or choose another --out") from None
        with contextlib.suppress(OSError):  # the pid is for the message; a full disk is not fatal here
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = fd
        try:
            yield folder
        finally:
            _held.pop(key, None)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def new_run(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder`` for a new run: refused if it already holds a run or a comparison."""
    with hold(folder) as folder:
        if (folder / STATE_FILE).exists():
            raise RunError(f"{folder} already holds a run; resume it with --resume {folder} "
                           "or choose another --out")
        if (folder / COMPARISON_PLAN).exists() or (folder / SEED_PLAN).exists():
            raise RunError(f"{folder} holds a comparison (--baseline); continue it with "
                           f"--resume {folder} or choose another --out")
        yield folder


RUN_MARKERS = ("run.json", STATE_FILE, COMPARISON_PLAN, SEED_PLAN)  # what makes a folder a run's


def replace_run(folder: str | os.PathLike) -> None:
    """``finetune --force``: empty ``folder`` for a new run, when it holds a run or a
    comparison that no live process holds (the lock says so). A folder that holds
    something else is never touched: refused with one line."""
    folder = Path(folder)
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return  # nothing to replace
    if not folder.is_dir() or not any((folder / m).exists() for m in RUN_MARKERS):
        raise RunError(f"{folder} is not a run folder (no {', '.join(RUN_MARKERS)}), so --force "
                       "will not empty it; choose another --out")
    with hold(folder, create=False):  # refused when a live run holds it
        for entry in folder.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        _logger.info("removed the earlier run in %s (--force)", folder)
