"""Which model sources a checkpoint may record: plain names and plain values.

A checkpoint is data. Its ``source`` says how to rebuild the base: ``timm:NAME`` or
``torchvision:NAME`` with plain keyword arguments, which never name files or
downloads, or code (a factory, ``pickle:PATH``), which runs only with the user's
consent (``trust.require``). These rules are checked on every metadata document read
(``metadata``) and before a recorded source is rebuilt (``checkpoint.rebuild``).
See docs/security.md.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SourceError
from .sources import IDENTIFIER, ModelSource, parse_source, resolve_timm_hub

# Builder arguments that make timm or torchvision read files or the network: a file
# never gets to choose those.
_LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                            "checkpoint_path", "cache_dir", "weights", "weights_backbone"})
_MODEL_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"  # a registered name: no hub, no folder
MAX_KWARG_INT = 2**20


def check_recorded_source(source: Any, what: str = "checkpoint", *, base: bool = False) -> None:
    """Refuse a recorded source that is not plain data: a model name that reaches a hub
    or a folder, kwargs that name files or downloads or are not plain values. Code it
    names (a factory, ``pickle:``) is checked for consent where it would run. A ``base``
    (the source a model was first opened from) may be a ``timm:local-dir:`` folder: a
    gates-only file rebuilds it from there, never from the network."""
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
    named = re.fullmatch(_MODEL_NAME, location) or (
        base and kind == "timm" and location.startswith("local-dir:/"))
    if kind in ("timm", "torchvision") and not named:
        raise CheckpointError(f"{what}: metadata source {spec!r:.80} is not a plain model name "
                              "(a checkpoint may not name a hub, a folder or a download)")
    _check_root(source.get("root"), kind, location, what)
    check_plain_kwargs(source.get("kwargs") or {}, what)


def check_plain_kwargs(kwargs: Any, what: str) -> None:
    """Builder arguments a file chose: plain values that never name files or downloads."""
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{what}: the builder arguments should be an object")
    for key, value in kwargs.items():
        if not re.fullmatch(IDENTIFIER, key) or key in _LOADER_KWARGS:
            raise CheckpointError(f"{what}: builder argument {key!r} is not allowed "
                                  "(a file may not name files or downloads to load)")
        if not _plain_kwarg(value):
            raise CheckpointError(f"{what}: builder argument {key}={value!r:.60} is not "
                                  f"a plain value (bool, int within ±{MAX_KWARG_INT}, finite "
                                  "float, short string, or a short list of these)")


def resolve_hub(source: ModelSource, what: str) -> ModelSource:
    """A ``timm:hf-hub:``/``local-dir:`` source resolved to its architecture (timm's own
    config reader); the builder arguments its config.json chose are a file's choice,
    held to the plain-value rule."""
    resolved = resolve_timm_hub(source)
    if resolved is not source:
        check_plain_kwargs(resolved.kwargs, f"{what} (config.json model_args)")
    return resolved


def _check_root(root: Any, kind: str, location: str, what: str) -> None:
    """``source.root``: the folder a ``package.module:factory`` was found in, put on the
    import path to rebuild it: an absolute folder."""
    if root is None:
        return
    if kind != "factory" or location.rpartition(":")[0].endswith(".py"):
        raise CheckpointError(f"{what}: metadata 'source.root' goes only with a "
                              "package.module:factory source")
    if not isinstance(root, str) or not 0 < len(root) <= 4096 or not Path(root).is_absolute():
        raise CheckpointError(f"{what}: metadata 'source.root' should be an absolute folder path")


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
    """The folder an imported package (or module) was found in; None when it is not
    imported."""
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
