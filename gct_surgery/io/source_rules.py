"""Which model sources a checkpoint may record: a file is data, not permission to run code.

A checkpoint is untrusted, yet its ``source`` names code that loading runs:
``os:system`` with ``{"command": ...}`` would be a remote code execution through a
.safetensors file. These rules are checked on every metadata document read
(``metadata``) and before a recorded source is rebuilt (``checkpoint.rebuild``).
See docs/security.md.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SourceError
from .sources import IDENTIFIER, ModelSource, parse_source

# Builder arguments that make timm or torchvision read files or the network: a file
# never gets to choose those.
_LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                            "checkpoint_path", "cache_dir", "weights", "weights_backbone"})
# Packages whose functions a hostile file could name as a "factory" to run commands
# or write files (besides the standard library and installed packages, refused by location).
_NEVER_FACTORIES = frozenset({"gct_surgery", "torch", "torchvision", "timm", "numpy",
                              "safetensors", "typer", "rich", "pip", "setuptools"})
MAX_KWARG_INT = 2**20


def check_recorded_source(source: Any, what: str = "checkpoint") -> None:
    """Refuse a source recorded in a checkpoint that would run code the user did not write.

    A recorded factory must live outside the Python installation (the user's own
    ``file.py`` or package), and kwargs are plain values that cannot point a builder at
    files. ``pickle:`` sources stay behind ``allow_pickle``.
    """
    if not isinstance(source, dict) or not isinstance(source.get("spec"), str) or not source["spec"]:
        raise CheckpointError(f"{what}: metadata 'source.spec' should be a non-empty string")
    spec = source["spec"]
    if len(spec) > 4096:
        raise CheckpointError(f"{what}: metadata 'source.spec' is too long")
    try:
        kind, location = parse_source(spec)
    except SourceError as e:
        raise CheckpointError(f"{what}: metadata source is invalid: {e}") from None
    if kind == "file":
        raise CheckpointError(f"{what}: metadata source {spec!r} names no architecture")
    if kind == "factory":
        _check_factory_origin(location, what)
    _check_root(source.get("root"), kind, location, what)
    kwargs = source.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{what}: metadata 'source.kwargs' should be an object")
    for key, value in kwargs.items():
        if not re.fullmatch(IDENTIFIER, key) or key in _LOADER_KWARGS:
            raise CheckpointError(f"{what}: metadata source argument {key!r} is not allowed "
                                  "(a checkpoint may not name files or downloads to load)")
        if not _plain_kwarg(value):
            raise CheckpointError(f"{what}: metadata source argument {key}={value!r:.60} is not "
                                  f"a plain value (bool, int within ±{MAX_KWARG_INT}, finite "
                                  "float, short string, or a short list of these)")


def _check_root(root: Any, kind: str, location: str, what: str) -> None:
    """``source.root``: the folder a ``package.module:factory`` was found in, put on the
    import path to rebuild it. An absolute folder outside the Python installation."""
    if root is None:
        return
    if kind != "factory" or location.rpartition(":")[0].endswith(".py"):
        raise CheckpointError(f"{what}: metadata 'source.root' goes only with a "
                              "package.module:factory source")
    if not isinstance(root, str) or not 0 < len(root) <= 4096 or not Path(root).is_absolute():
        raise CheckpointError(f"{what}: metadata 'source.root' should be an absolute folder path")
    try:
        resolved = Path(root).resolve()
    except (OSError, RuntimeError, ValueError):
        raise CheckpointError(f"{what}: metadata 'source.root' {root!r:.80} is invalid") from None
    if any(_inside(resolved, d) for d in _installation_dirs()):
        raise CheckpointError(f"{what}: metadata 'source.root' {root!r:.80} is inside the Python "
                              "installation; a checkpoint may only name your own model code")


def recordable(source: ModelSource) -> ModelSource:
    """The source as a checkpoint records it, so that it rebuilds from any folder: a
    ``file.py`` by its absolute path (its neighbours sit beside it), a
    ``package.module`` with the folder it was imported from (call after building)."""
    kind, location = parse_source(source.spec)
    if kind != "factory":
        return source
    module_ref, _, attr = location.rpartition(":")
    if module_ref.endswith(".py"):
        return replace(source, spec=f"{Path(module_ref).resolve()}:{attr}")
    return replace(source, root=source.root or import_root(module_ref))


def import_root(module_ref: str) -> str | None:
    """The folder an imported user package (or module) was found in; None when it is
    not imported or is installed (importable from anywhere)."""
    module = sys.modules.get(module_ref.split(".")[0])
    if module is None:
        return None
    paths = list(getattr(module, "__path__", None) or [])
    file = getattr(module, "__file__", None)
    if paths:
        folder = Path(paths[0]).resolve().parent
    elif file:
        folder = Path(file).resolve().parent
    else:
        return None
    if any(_inside(folder, d) for d in _installation_dirs()):
        return None
    return str(folder)


def _plain_kwarg(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 256
    if isinstance(value, list) and depth == 0:
        return len(value) <= 64 and all(_plain_kwarg(v, 1) for v in value)
    return False


def _check_factory_origin(location: str, what: str) -> None:
    module_ref, _, attr = location.rpartition(":")
    refusal = (f"{what}: metadata names the factory {location!r} in {{where}}; a checkpoint "
               "may only name your own model code (a file.py:factory or package outside the "
               "Python installation), since loading calls it")
    if attr.startswith("_"):
        raise CheckpointError(refusal.format(where="a private name"))
    if module_ref.endswith(".py"):
        try:
            resolved = Path(module_ref).resolve()
        except (OSError, RuntimeError, ValueError):
            raise CheckpointError(f"{what}: metadata factory path {module_ref!r} is invalid") from None
        if any(_inside(resolved, d) for d in _installation_dirs()):
            raise CheckpointError(refusal.format(where="the Python installation"))
        return
    top = module_ref.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise CheckpointError(refusal.format(where="the standard library"))
    if top in _NEVER_FACTORIES:
        raise CheckpointError(refusal.format(where=f"the {top} package"))
    try:
        found = importlib.util.find_spec(top)  # a top-level name: located, not imported
    except (ImportError, ValueError):
        found = None
    places = [found.origin] if found is not None and found.origin else []
    if found is not None and found.submodule_search_locations:
        places += list(found.submodule_search_locations)
    for place in places:
        if place and any(_inside(Path(place).resolve(), d) for d in _installation_dirs()):
            raise CheckpointError(refusal.format(where="an installed package"))


@functools.lru_cache(maxsize=1)
def _installation_dirs() -> tuple[Path, ...]:
    """The standard library and site-packages folders of this interpreter."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    dirs = [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some embedded interpreters lack these
        pass
    return tuple(Path(d).resolve() for d in dirs if d)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
