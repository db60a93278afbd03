"""Consent: code that a file names runs only if this user chose that exact code.

A checkpoint, a gates-only file or a run folder may name Python code that opening it
would run: a model factory (``/abs/net.py:build``, ``package.module:build``), a task,
a pickled module (``pickle:PATH``). No list of "dangerous" places can tell a user's own
factory from ``shutil.py:rmtree`` of a second Python on the same disk, so the rule is
consent, not location. The code runs only when the user

- chose it in this call: ``--trust-source`` (``trusting()``, ``load(trust_source=True)``);
- or chose it before: code the user named themselves (``--arch FILE.py:build``,
  ``save(source=...)``, ``--task``, ``gct-surgery trust SPEC``) is remembered in a small
  store (``$XDG_CONFIG_HOME/gct-surgery/trusted.json``, or the file
  ``$GCT_SURGERY_TRUST_FILE`` names) by path, sha256 of the bytes that run, and the
  attribute. A changed file is a different choice: the tool asks again.

Before consent nothing is imported and ``sys.path`` is untouched: the code's files are
found and hashed by path alone. Files the factory imports from beside it are not hashed.
Refusals are one line and never prompt (jobs on a cluster have nobody to ask).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError, SourceError, UserError
from .atomic import atomic_write_text, make_folder
from .sources import parse_source

STORE_ENV = "GCT_SURGERY_TRUST_FILE"
STORE_VERSION = 1
_granted = contextvars.ContextVar("gct_surgery_trust_source", default=False)
_chosen: set[tuple[str, str, str]] = set()  # this process's choices, if the store is read-only


class UntrustedCodeError(CheckpointError):
    """A file names code the user has not chosen to run."""


@dataclass(frozen=True)
class CodeRef:
    """What would run: the spec as recorded, its file(s) and their hash, the attribute."""

    spec: str
    root: str | None
    path: Path       # the module file (or the pickle) that runs
    attr: str        # the factory or task object; "" for a pickle
    sha256: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (str(self.path), self.sha256, self.attr)

    def trust_command(self) -> str:
        root = f" --root {self.root}" if self.root else ""
        return f"gct-surgery trust {self.spec}{root}"


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Consent, for this call, to run whatever code the files opened inside name."""
    token = _granted.set(bool(enabled) or _granted.get())
    try:
        yield
    finally:
        _granted.reset(token)


def locate(spec: str, root: str | None = None) -> CodeRef:
    """The file(s) ``spec`` would run and their sha256, found by path, never imported."""
    kind, location = parse_source(spec)
    if kind == "pickle":
        files, attr = [_existing(Path(location), spec)], ""
    elif kind == "factory":
        module_ref, _, attr = location.rpartition(":")
        if module_ref.endswith(".py"):
            files = [_existing(Path(module_ref), spec)]
        else:
            files = _module_files(module_ref, root, spec)
    else:
        raise SourceError(f"{spec!r} names no code (a file.py:object, package.module:object "
                          "or pickle:PATH)")
    digest = hashlib.sha256()
    for f in files:  # a package module runs its packages' __init__.py files first
        data = f.read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    return CodeRef(spec, root, files[-1], attr, digest.hexdigest())


def _existing(path: Path, spec: str) -> Path:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise SourceError(f"{spec}: no such file {resolved}")
    return resolved


def _module_files(module_ref: str, root: str | None, spec: str) -> list[Path]:
    """``package/__init__.py ... module.py`` for ``package.module``, looked up in ``root``
    or else on the import path, the way the import system would find it."""
    parts = module_ref.split(".")
    folders = [root] if root else [os.getcwd(), *(p or os.getcwd() for p in sys.path)]
    for folder in folders:
        base, files = Path(folder), []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if (base / part / "__init__.py").is_file():
                base = base / part
                files.append(base / "__init__.py")
            elif last and (base / f"{part}.py").is_file():
                files.append(base / f"{part}.py")
            elif not last and (base / part).is_dir():
                base = base / part  # a namespace package: no __init__.py to run
            else:
                files = []
                break
        if files:
            return [f.resolve() for f in files]
    where = root or "the import path"
    raise SourceError(f"{spec}: cannot find {module_ref} in {where}")


# --- the store ----------------------------------------------------------------------------

def store_path() -> Path:
    """Where remembered choices live: ``$GCT_SURGERY_TRUST_FILE``, else the user's config
    folder (``$XDG_CONFIG_HOME`` or ``~/.config``)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "gct-surgery" / "trusted.json"


def read_store(path: Path) -> list[dict]:
    """The remembered entries; a store that is a symlink or not ours is refused."""
    if path.is_symlink():
        raise UserError(f"{path} (the trusted-code store) is a symbolic link; refused: replace "
                        f"it with a plain file, or point {STORE_ENV} at one")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the trusted-code store {path}: {e}; fix or delete it"
                        ) from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"the trusted-code store {path} is not gct-surgery's; fix or delete it")
    return [e for e in entries if isinstance(e, dict)]


def is_trusted(ref: CodeRef) -> bool:
    if _granted.get() or ref.key in _chosen:
        return True
    return any((e.get("path"), e.get("sha256"), e.get("attr")) == ref.key
               for e in read_store(store_path()))


def remember(spec: str, root: str | None = None) -> CodeRef | None:
    """Record that the user chose ``spec`` (a factory, task or pickle they named), so
    files that name it open without a flag. None for a spec that names no code."""
    if not isinstance(spec, str) or parse_source(spec)[0] not in ("factory", "pickle"):
        return None
    try:
        ref = locate(spec, root)
    except SourceError:  # nothing there to remember: the import says what is wrong
        return None
    _chosen.add(ref.key)
    path = store_path()
    from filelock import FileLock

    try:
        make_folder(path.parent, "config folder")
        with FileLock(str(path) + ".lock", timeout=60):  # array jobs may write at once
            entries = read_store(path)
            if any((e.get("path"), e.get("sha256"), e.get("attr")) == ref.key for e in entries):
                return ref
            entries = [e for e in entries if (e.get("path"), e.get("attr")) != ref.key[::2]]
            entries.append({"path": str(ref.path), "attr": ref.attr, "sha256": ref.sha256,
                            "spec": ref.spec, "added": datetime.datetime.now().isoformat(
                                timespec="seconds")})
            doc = {"format": "gct-surgery-trust", "version": STORE_VERSION, "entries": entries}
            atomic_write_text(path, json.dumps(doc, indent=1) + "\n", mode=0o600)
    except (UserError, OSError) as e:  # a read-only home: this process still remembers
        import warnings

        warnings.warn(f"could not remember {spec} in {path} ({e}); it opens in this process "
                      "only", stacklevel=2)
    return ref


def require(spec: str, *, root: str | None = None, named_by: str, what: str = "code") -> None:
    """Refuse, in one line, to run the code a file names unless the user chose it. A spec
    that names no code (``timm:NAME``, a built-in task) needs no consent."""
    if not isinstance(spec, str) or parse_source(spec)[0] not in ("factory", "pickle"):
        return
    ref = locate(spec, root)
    if is_trusted(ref):
        return
    changed = any((e.get("path"), e.get("attr")) == (str(ref.path), ref.attr)
                  for e in read_store(store_path()))
    why = ("changed since you trusted it" if changed else "which you have not chosen to run")
    raise UntrustedCodeError(
        f"{named_by} names {what} to run: {ref.path}{':' + ref.attr if ref.attr else ''}, "
        f"{why}; refused. If you trust it, pass --trust-source (Python: trust_source=True) "
        f"or remember it with `{ref.trust_command()}`")
