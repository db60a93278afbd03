"""Atomic file writes: a killed run never leaves a half-written output behind, and a
write that fails is one clear error.

Every output is written to a temp file in the destination folder, fsynced, given the
umask's mode and renamed over the destination with ``os.replace`` (atomic on POSIX).
Whatever goes wrong on the way (a folder in the way, a read-only folder, a full disk)
becomes a ``WriteError``: one line naming the file, the reason and the next step; the
previous file keeps its content. A temp file's name carries its writer's pid, so the
leftover of a killed write is told from a live one by asking whether that pid lives.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError

# Called with the destination just before each rename. None in production; the tests'
# fault injection (train/faults.py, GCT_SURGERY_FAULT) installs a kill here.
before_replace: Callable[[Path], None] | None = None


class WriteError(UserError):
    """An output could not be written (disk full, read-only, a folder in the way...)."""

    def __init__(self, message: str, path: str | os.PathLike = "", reason: str = "",
                 code: int | None = None) -> None:
        super().__init__(message)
        self.path, self.reason, self.code = Path(path), reason, code


_NEXT_STEP = {
    errno.ENOSPC: "free some space (or choose another location) and run the command again",
    errno.EDQUOT: "free some space (or choose another location) and run the command again",
    errno.EFBIG: "choose a file system that allows larger files and run the command again",
    errno.EROFS: "choose a location you can write to",
    errno.EACCES: "choose a location you can write to (or fix its permissions)",
    errno.EPERM: "choose a location you can write to (or fix its permissions)",
}


def write_error(path: str | os.PathLike, reason: str, hint: str = "",
                code: int | None = None) -> WriteError:
    """The one-line error of a failed write; ``hint`` (``"; continue with ..."``)
    replaces the default next step."""
    path = Path(path)
    step = hint or f"; {_NEXT_STEP.get(code, 'fix the cause and run the command again')}"
    return WriteError(f"could not write {path}: {reason}. The previous {path.name}, if any, "
                      f"is unchanged{step}", path, reason, code)


def as_write_error(path: str | os.PathLike, error: BaseException,
                   hint: str = "") -> WriteError | None:
    """``error`` as a ``WriteError`` when it is a failed write: an ``OSError`` (also as the
    cause of another library's exception) or safetensors' I/O error, whose errno only
    its text carries. None for anything else, which keeps its own message."""
    if isinstance(error, WriteError):  # a file's write error takes the caller's next step
        rewrite = hint and error.code
        return write_error(error.path, error.reason, hint, error.code) if rewrite else error
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, UserError):
        if isinstance(seen, OSError):
            return write_error(path, seen.strerror or str(seen), hint, seen.errno)
        found = re.search(r"\(os error (\d+)\)", str(seen))
        if found and type(seen).__name__ == "SafetensorError":
            return write_error(path, os.strerror(int(found[1])), hint, int(found[1]))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def storage_error(path: str | os.PathLike, error: BaseException) -> WriteError | None:
    """``as_write_error`` only for a storage fault (disk full, read-only, no permission,
    I/O error), for a library that also fails on its own with an unrelated ``OSError``."""
    converted = as_write_error(path, error)
    storage = converted is not None and converted.code in (*_NEXT_STEP, errno.EIO)
    return converted if storage else None


def make_folder(folder: str | os.PathLike, what: str = "folder") -> None:
    """``mkdir -p`` whose failure (a file in the way, read-only, disk full) is one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(f"could not create the {what} {folder}: a file of that name is in the "
                         "way; choose another path", folder, "a file is in the way") from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise WriteError(f"could not create the {what} {folder}: {reason}; "
                         f"{_NEXT_STEP.get(e.errno, 'fix the cause and run the command again')}",
                         folder, reason) from None


@contextlib.contextmanager
def _temp_beside(dest: Path, make: Callable[..., str]) -> Iterator[Path]:
    """A temp file or folder (``make``: ``_new_file`` or mkdtemp) beside ``dest``, removed
    if the block fails; every failure of a write is raised as a ``WriteError``."""
    make_folder(dest.parent)
    remove_stale_temps(dest.parent, dest.name)
    tmp = None
    try:
        tmp = Path(make(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
        yield tmp
    except BaseException as e:
        if tmp is not None:
            _remove(tmp)
        converted = as_write_error(dest, e) if isinstance(e, Exception) else None
        if converted is not None and converted is not e:
            raise converted from None
        raise


def _replace(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` (fsynced) over ``dest`` and make the rename durable."""
    if before_replace is not None:
        before_replace(dest)
    os.replace(tmp, dest)
    with contextlib.suppress(OSError):  # not every file system syncs a folder
        _fsync(dest.parent)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``dest`` to write; on success it gets ``mode`` (else the
    umask's; a private file passes 0o600) and replaces ``dest``. On any error the temp
    file is removed and ``dest`` keeps its previous content."""
    dest = Path(dest)
    if dest.is_dir():
        raise WriteError(f"could not write {dest}: it is a folder; give a file path (e.g. "
                         f"{dest / 'out.safetensors'})", dest, "it is a folder")
    with _temp_beside(dest, _new_file) as tmp:
        yield tmp
        # on what is there now: a writer may have replaced the file (safetensors does)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        _fsync(tmp)
        _replace(tmp, dest)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``dest`` to fill; on success it takes ``dest``'s name
    (one rename when ``dest`` is absent or empty; else each file replaces its namesake
    and other files stay). On any error ``dest`` is unchanged."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise WriteError(f"could not write {dest}: a file of that name is in the way; choose "
                         "another path", dest, "a file is in the way")
    with _temp_beside(dest, tempfile.mkdtemp) as tmp:
        yield tmp
        mask = _umask()
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
            _fsync(path)
        os.chmod(tmp, 0o777 & ~mask)
        try:
            _replace(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            for path in tmp.iterdir():
                os.replace(path, dest / path.name)
            tmp.rmdir()


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(dest, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"), mode)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temp files and folders (``.NAME.PID.XXXX.tmp``) that killed writes left
    in ``folder`` (of the output ``name`` only, if given): those whose writer's pid is
    gone. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            pid = entry.name.split(".")[-3] if entry.name.count(".") >= 3 else ""
            if (entry.name.startswith(f".{name}." if name else ".") and entry.name.endswith(".tmp")
                    and pid.isdigit() and not _alive(int(pid))):
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def _umask() -> int:
    mask = os.umask(0o077)  # the only portable way to read it; the instant errs private
    os.umask(mask)
    return mask


def _new_file(**kwargs) -> str:
    fd, name = tempfile.mkstemp(**kwargs)
    os.close(fd)
    return name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (where a rename lives)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
