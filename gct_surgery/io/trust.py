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
found and hashed by path alone (``locate``). Files the factory imports from beside it
are not hashed. Refusals are one line and never prompt (jobs on a cluster have nobody
to ask). After consent, ``import_object`` imports the code as a script would: a
``file.py`` with its own folder first on the import path (its neighbours import), a
``package.module`` from its recorded ``root`` or the current folder, the import path
restored afterwards.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import hashlib
import json
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import CheckpointError, SourceError, UserError, first_line
from .atomic import atomic_write_text, make_folder

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"

STORE_ENV = "GCT_SURGERY_TRUST_FILE"
_granted = contextvars.ContextVar("gct_surgery_trust_source", default=False)
_chosen: list[dict] = []  # this process's choices, if the store is read-only


class UntrustedCodeError(CheckpointError):
    """A file names code the user has not chosen to run."""


@dataclass(frozen=True)
class CodeRef:
    """What would run: the spec as recorded, its file(s) and their hash, the attribute."""

    spec: str
    path: Path       # the module file (or the pickle) that runs
    attr: str        # the factory or task object; "" for a pickle
    sha256: str

    def entry(self) -> dict:
        return {"path": str(self.path), "attr": self.attr, "sha256": self.sha256}

    def matches(self, entry: dict, *, same_bytes: bool = True) -> bool:
        """Whether a store entry is this code (``same_bytes=False``: at any hash)."""
        return ((entry.get("path"), entry.get("attr")) == (str(self.path), self.attr)
                and (not same_bytes or entry.get("sha256") == self.sha256))

    def __str__(self) -> str:
        return f"{self.path}:{self.attr}" if self.attr else str(self.path)


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Consent, for this call, to run whatever code the files opened inside name."""
    token = _granted.set(bool(enabled) or _granted.get())
    try:
        yield
    finally:
        _granted.reset(token)


def code_spec(spec: Any) -> tuple[str, str] | None:
    """``(module, attribute)`` for a spec that names code: ``path/to/file.py:obj``,
    ``package.module:obj``, or ``pickle:PATH`` as ``(PATH, "")``; None for any other."""
    if not isinstance(spec, str) or spec.startswith(("timm:", "torchvision:")):
        return None
    if spec.startswith("pickle:"):
        return (spec[len("pickle:"):], "") if spec != "pickle:" else None
    module, sep, attr = spec.rpartition(":")
    dotted = re.fullmatch(rf"{IDENTIFIER}(\.{IDENTIFIER})*", module)
    return (module, attr) if sep and re.fullmatch(IDENTIFIER, attr) and (
        module.endswith(".py") or dotted) else None


def locate(spec: str, root: str | None = None) -> CodeRef:
    """The file(s) ``spec`` would run and their sha256, found by path, never imported."""
    if code_spec(spec) is None:
        raise SourceError(f"{spec!r} names no code (a file.py:object, package.module:object "
                          "or pickle:PATH)")
    module_ref, attr = code_spec(spec)
    if not attr or module_ref.endswith(".py"):
        files = [Path(module_ref).expanduser().resolve()]
        if not files[0].is_file():
            raise SourceError(f"{spec}: no such file {files[0]}")
    else:
        files = _module_files(module_ref, root, spec)
    digest = hashlib.sha256()
    for f in files:  # a package module runs its packages' __init__.py files first
        data = f.read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    return CodeRef(spec, files[-1], attr, digest.hexdigest())


def _module_files(module_ref: str, root: str | None, spec: str) -> list[Path]:
    """``package/__init__.py ... module.py`` for ``package.module``, looked up in ``root``
    or else on the import path, the way the import system would find it."""
    *packages, last = module_ref.split(".")
    for folder in [root] if root else [os.getcwd(), *(p or os.getcwd() for p in sys.path)]:
        base = Path(folder).joinpath(*packages)
        found = [f for f in (base / last / "__init__.py", base / f"{last}.py") if f.is_file()]
        if found:  # a namespace package has no __init__.py to run
            inits = [Path(folder).joinpath(*packages[:i], "__init__.py")
                     for i in range(1, len(packages) + 1)]
            return [f.resolve() for f in [*inits, found[0]] if f.is_file()]
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


def remember(spec: str, root: str | None = None) -> CodeRef | None:
    """Record that the user chose ``spec`` (a factory, task or pickle they named), so
    files that name it open without a flag. None for a spec that names no code."""
    try:
        ref = locate(spec, root)
    except SourceError:  # no code, or nothing there to remember: the import says what is wrong
        return None
    _chosen.append(ref.entry())
    path = store_path()
    from filelock import FileLock

    try:
        make_folder(path.parent, "config folder")
        with FileLock(str(path) + ".lock", timeout=60):  # array jobs may write at once
            entries = read_store(path)
            if any(map(ref.matches, entries)):
                return ref
            entries = [e for e in entries if not ref.matches(e, same_bytes=False)] + [
                {**ref.entry(), "spec": ref.spec,
                 "added": datetime.datetime.now().isoformat(timespec="seconds")}]
            doc = {"format": "gct-surgery-trust", "version": 1, "entries": entries}
            atomic_write_text(path, json.dumps(doc, indent=1) + "\n", mode=0o600)
    except (UserError, OSError) as e:  # a read-only home: this process still remembers
        import warnings

        warnings.warn(f"could not remember {spec} in {path} ({e}); it opens in this process "
                      "only", stacklevel=2)
    return ref


def require(spec: str, *, root: str | None = None, named_by: str, what: str = "code") -> None:
    """Refuse, in one line, to run the code a file names unless the user chose it. A spec
    that names no code (``timm:NAME``, a built-in task) needs no consent."""
    if code_spec(spec) is None:
        return
    ref = locate(spec, root)
    if _granted.get() or any(map(ref.matches, _chosen)):
        return
    entries = read_store(store_path())
    if any(map(ref.matches, entries)):
        return
    changed = any(ref.matches(e, same_bytes=False) for e in entries)
    why = ("changed since you trusted it" if changed else "which you have not chosen to run")
    raise UntrustedCodeError(
        f"{named_by} names {what} to run: {ref}, "
        f"{why}; refused. If you trust it, pass --trust-source (Python: trust_source=True) "
        f"or remember it with `gct-surgery trust {spec}{f' --root {root}' if root else ''}`")


# --- user code: imported as a script would be -------------------------------------------

def code_folder(location: str, root: str | None = None) -> str:
    """The folder user code imports from: a file's own folder (its neighbours import),
    else the package's recorded ``root``, else the current folder."""
    module = location.rpartition(":")[0]
    return str(Path(module).resolve().parent) if module.endswith(".py") else root or os.getcwd()


@contextlib.contextmanager
def on_import_path(folder: str) -> Iterator[None]:
    """``folder`` first on the import path, as for a script's folder, for the block only."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def import_object(location: str, what: str = "SOURCE", error: type = SourceError,
                  root: str | None = None):
    """The object that ``path/to/file.py:name`` or ``package.module:name`` names, imported
    from ``code_folder``. Shared by factory sources and ``--task``; ``error`` is the
    UserError kind to raise. Whether code a *file* names may run at all is
    ``trust.require``'s question, asked before this."""
    module_ref, _, attr = location.rpartition(":")
    folder, path = code_folder(location, root), Path(module_ref)
    if module_ref.endswith(".py") and not path.is_file():
        raise error(f"{what}: no such file: {path}" + (
            "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"))
    try:
        with on_import_path(folder):
            module = _import(module_ref)
    except ImportError as e:
        where = (f"the checkpoint recorded it in {root}: put {module_ref.split('.')[0]} there, "
                 "or rebuild where it is importable" if root
                 else f"looked in {folder} and on the import path")
        raise error(f"{what}: cannot import {module_ref!r}: {first_line(e)} ({where})") from None
    except Exception as e:  # the user's module raised while importing
        raise error(f"{what}: {module_ref} failed to import: {type(e).__name__}: "
                    f"{first_line(e)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise error(f"{what}: {module_ref} has no {attr!r}")
    return obj


def _import(module_ref: str):
    """A module by name, or a ``.py`` file as a module of its own (registered in
    ``sys.modules``, where dataclasses and pickling look it up)."""
    if not module_ref.endswith(".py"):
        return importlib.import_module(module_ref)
    name = f"gct_user_{abs(hash(str(Path(module_ref).resolve())))}"
    spec = importlib.util.spec_from_file_location(name, module_ref)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
