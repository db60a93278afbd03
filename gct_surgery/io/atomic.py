"""Atomic file writes: a killed run never leaves a half-written output behind, and a
write that fails is one clear error.

Every output is written to a temp file in the destination folder, flushed and
fsynced, then renamed over the destination with ``os.replace`` (atomic on POSIX).
The writer holds an advisory lock on its temp file while it writes: a temp file
nobody holds is a leftover of a killed write, and the next write of the same output
removes it, while a temp file another live process is writing is left alone.

Whatever goes wrong on the way (the destination is a folder, the folder is read-only,
the disk is full, safetensors' own I/O error) becomes a ``WriteError``: one line that
names the file, the reason and the next step. The previous file keeps its content.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError

try:  # advisory locks; without them (Windows) a leftover temp file simply stays
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class WriteError(UserError):
    """An output could not be written (disk full, read-only, a folder in the way...)."""

    def __init__(self, message: str, path: str | os.PathLike = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = Path(path) if path else None
        self.reason = reason
        self.code: int | None | bool = False  # the errno of a file write (write_error)


_NEXT_STEP = {
    errno.ENOSPC: "free some space (or choose another location) and run the command again",
    errno.EDQUOT: "free some space (or choose another location) and run the command again",
    errno.EFBIG: "choose a file system that allows larger files and run the command again",
    errno.EROFS: "choose a location you can write to",
    errno.EACCES: "choose a location you can write to (or fix its permissions)",
    errno.EPERM: "choose a location you can write to (or fix its permissions)",
}


def write_error(path: str | os.PathLike, reason: str, hint: str = "", code: int | None = None) -> WriteError:
    """The one-line error of a failed write. ``hint`` (``"; continue with ..."``)
    replaces the default next step."""
    path = Path(path)
    step = hint or f"; {_NEXT_STEP.get(code, 'fix the cause and run the command again')}"
    error = WriteError(f"could not write {path}: {reason}. The previous {path.name}, if any, "
                       f"is unchanged{step}", path, reason)
    error.code = code
    return error


def as_write_error(path: str | os.PathLike, error: BaseException, hint: str = "") -> WriteError | None:
    """``error`` as a ``WriteError`` when it is a failed write: an ``OSError`` (also as
    the cause of another library's exception) or safetensors' ``SafetensorError`` for
    an I/O error. None for anything else, which keeps its own message."""
    if isinstance(error, WriteError):  # a file's write error takes the caller's next step
        rewrite = hint and error.code is not False and error.path is not None
        return write_error(error.path, error.reason, hint, error.code) if rewrite else error
    seen: BaseException | None = error
    for _ in range(8):  # the exception, its cause, its context...
        if seen is None or isinstance(seen, UserError):  # a message of its own
            break
        if isinstance(seen, OSError):
            return write_error(path, seen.strerror or str(seen) or type(seen).__name__, hint, seen.errno)
        if type(seen).__name__ == "SafetensorError" and "I/O error" in str(seen):
            reason = str(seen).split("I/O error:", 1)[1].split("(os error")[0].strip()
            code = str(seen).rsplit("(os error", 1)[-1].strip(" )")
            return write_error(path, reason or "I/O error", hint, int(code) if code.isdigit() else None)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def storage_error(path: str | os.PathLike, error: BaseException) -> WriteError | None:
    """``as_write_error`` only for a storage fault (disk full, quota, file too large,
    read-only, no permission, I/O error): for a library that may also fail on its own
    and carry an unrelated ``OSError`` in its exception's context."""
    converted = as_write_error(path, error)
    return converted if converted is not None and converted.code in (*_NEXT_STEP, errno.EIO) else None


def make_folder(folder: str | os.PathLike, what: str = "folder") -> Path:
    """``mkdir -p`` whose failure (a file in the way, read-only, disk full) is one line."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"could not create the {what} {folder}: a file of that name is in the "
                         "way; choose another path", folder, "a file is in the way") from None
    except NotADirectoryError:
        raise WriteError(f"could not create the {what} {folder}: part of that path is a file, "
                         "not a folder; choose another path", folder, "not a folder") from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise WriteError(f"could not create the {what} {folder}: {reason}; "
                         f"{_NEXT_STEP.get(e.errno, 'fix the cause and run the command again')}",
                         folder, reason) from None
    return folder


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success fsync it and rename it over ``dest``
    (with ``mode``, or the umask's default; a private file passes 0o600).

    On any error the temp file is removed, ``dest`` keeps its previous content, and a
    failed write is raised as a ``WriteError``.
    """
    dest = Path(dest)
    if dest.is_dir():
        raise WriteError(f"could not write {dest}: it is a folder; give a file path (e.g. "
                         f"{dest / 'out.safetensors'})", dest, "it is a folder")
    make_folder(dest.parent)
    remove_stale_temps(dest.parent, dest.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise as_write_error(dest, e) from None
    _lock(fd)  # held until the rename: the temp file is live, not a leftover
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and a writer may replace the temp file with one of its own
        # (safetensors does): set the mode on whatever file is there now, once.
        os.chmod(tmp_path, mode if mode is not None else 0o666 & ~_umask())
        _fault_before_rename(dest, tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        converted = as_write_error(dest, e) if isinstance(e, Exception) else None
        if isinstance(e, WriteError) and e.path == tmp_path:  # a nested write of our temp file
            converted = write_error(dest, e.reason, code=e.code if isinstance(e.code, int) else None)
        if converted is not None and converted is not e:
            raise converted from None
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``dest`` to fill; on success its files get the umask's
    mode and are fsynced, and it takes ``dest``'s name (one rename when ``dest`` is
    absent or empty; else each file is renamed over its namesake, other files stay).

    On any error the temp folder is removed and ``dest`` is unchanged."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise WriteError(f"could not write {dest}: a file of that name is in the way; choose "
                         "another path", dest, "a file is in the way")
    make_folder(dest.parent)
    remove_stale_temps(dest.parent, dest.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise as_write_error(dest, e) from None
    fd = os.open(tmp, os.O_RDONLY)
    _lock(fd)  # held until the rename, as for a file
    try:
        yield tmp
        mask = _umask()
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~mask)
        try:
            os.replace(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            for path in tmp.iterdir():
                os.replace(path, dest / path.name)
            tmp.rmdir()
            _fsync_dir(dest)
        _fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        converted = as_write_error(dest, e) if isinstance(e, Exception) else None
        if converted is not None and converted is not e:
            raise converted from None
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(dest, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"), mode)


# --- leftovers of killed writes -------------------------------------------------------

def _lock(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temp files and folders (``.NAME.XXXX.tmp``) that killed writes left in ``folder``
    (of the output ``name`` only, if given). A temp file whose writer is alive holds its
    lock and is left alone. Returns what was removed."""
    if fcntl is None:
        return []
    prefix = f".{name}." if name else "."
    removed = []
    try:
        entries = [e.path for e in os.scandir(folder)
                   if e.name.startswith(prefix) and e.name.endswith(".tmp")
                   and (e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False))]
    except OSError:
        return []
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.isdir(path):  # an ``atomic_folder``'s leftover
                shutil.rmtree(path)
            else:
                os.unlink(path)  # nobody writes it: a killed write's leftover
            removed.append(Path(path))
        except OSError:
            pass  # a live writer holds it (or it is already gone)
        finally:
            os.close(fd)
    return removed


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
    """The process umask. Read from /proc where it can be: setting it to read it back
    would, for an instant, let another thread create files with no mask at all."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # the brief window errs on the private side
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
