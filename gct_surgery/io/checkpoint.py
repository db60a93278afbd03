"""The gct-surgery checkpoint: one safetensors file that rebuilds itself.

Every tensor is stored under its original name (gates add ``*.gate.*`` keys), so any
safetensors reader can read it. The metadata document (``metadata.CheckpointMeta``)
says how to rebuild the model; ``load_checkpoint`` builds the base, replays the
injection and loads the tensors with strict key checks. ``gct_surgery.load`` is the
public entry point (it also applies gates-only files, ``adapter``).

A loaded (or saved) model carries its record (``record_of``), so a user's own loop can
load, train and ``save(model, path)`` without handling metadata; a model the user
built themselves gets a record from ``save(..., source=...)``.

The header is validated before anything large is allocated: a hostile or corrupt
file costs a clear error, never a huge allocation. See docs/checkpoint-format.md.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.gate import GateConfig
from ..core.surgery import gated_modules, gates, inject, is_gate_parameter
from ..core.targets import TargetSpec
from ..errors import CheckpointError, SourceError, UserError
from .metadata import (CROP_MODES, INTERPOLATIONS, METADATA_KEY, PREPROCESSING_KEYS, CheckpointMeta,
                       check_against_header)
from .safetensors_file import dedupe_shared, read_header, read_tensors, restore_aliases, save_tensors, sniff
from .source_rules import check_recorded_source, recordable
from .sources import ModelSource, build_model, model_data_config, parse_source
from .trust import remember, require
from .state_dicts import STATE_DICT_SUFFIXES, load_weights

RECORD_ATTR = "_gct_record"  # the CheckpointMeta a model was loaded or saved with


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """The validated gct-surgery metadata of a checkpoint; an error if it is not one of
    ours, saying the command that makes one (or, for a run folder, the file in it)."""
    hint = run_folder_hint(Path(path))
    if hint:
        raise CheckpointError(hint)
    try:
        header, metadata = read_header(path)
    except CheckpointError as e:
        if Path(path).is_file() and sniff(path) in ("torch-zip", "pickle"):
            raise CheckpointError(f"{e}: first `gct-surgery inject {path} --arch timm:NAME` (a timm "
                                  f"train.py checkpoint names its own), then use the "
                                  f"{default_checkpoint_name(str(path))} it writes") from None
        raise
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a gct-surgery checkpoint (no "
            f"{METADATA_KEY} metadata): a plain state dict. Make a checkpoint of it with "
            f"`gct-surgery inject {path} --arch timm:NAME` (--arch names the architecture it "
            f"was trained as), then use the {default_checkpoint_name(str(path))} it writes")
    meta = CheckpointMeta.from_json(metadata[METADATA_KEY], path)
    check_against_header(meta, header, path)
    return meta


def run_folder_hint(path: Path) -> str | None:
    """A run folder where a checkpoint file belongs: the file in it to give instead."""
    if not path.is_dir():
        return None
    found = [path / n for n in RUN_CHECKPOINTS if (path / n).is_file()]
    if not found:
        return None
    rest = f" (or {', '.join(map(str, found[1:]))})" if len(found) > 1 else ""
    return f"{path} is a run folder, not a checkpoint: use {found[0]}{rest}"


RUN_CHECKPOINTS = ("best.safetensors", "last.safetensors", "ema.safetensors")  # what a run writes
_WEIGHTS_SUFFIXES = (".tar", *STATE_DICT_SUFFIXES)


def default_checkpoint_name(source: str) -> Path:
    """The gated checkpoint's name for a SOURCE: ``model.pth.tar`` ->
    ``model.gct.safetensors`` beside it; ``timm:resnet18`` -> ``resnet18.gct.safetensors``
    (``hf-hub:org/name``'s name, a ``local-dir``'s folder name) in the current folder."""
    kind, location = parse_source(source)
    if kind in ("file", "pickle"):
        path = Path(location)
        name = path.name
        while Path(name).suffix in _WEIGHTS_SUFFIXES and Path(name).stem:
            name = Path(name).stem
        return path.with_name(f"{name}.gct.safetensors")
    if kind == "factory":
        name = location.rpartition(":")[2]
    else:
        name = location.partition(":")[2] if location.startswith(("hf-hub:", "local-dir:")) else location
        name = Path(name.rstrip("/\\").split("@")[0]).name or "model"
    return Path(f"{name}.gct.safetensors")


def is_gct_checkpoint(path: str | os.PathLike) -> bool:
    """True for a readable safetensors file that carries gct-surgery metadata."""
    try:
        _, metadata = read_header(path)
    except CheckpointError:
        return False
    return METADATA_KEY in metadata


def save(model, path: str | os.PathLike, meta: CheckpointMeta | None = None, *,
         source: Any = None, data: dict | None = None) -> Path:
    """Save a (gated) model as one self-describing safetensors file that ``load`` rebuilds.

    The record is ``meta`` if given, else the one the model carries (``load`` returned
    it, or it was saved before), else a new one from ``source``: how to rebuild the
    model, ``"path/to/file.py:factory"``, ``"package.module:factory"``,
    ``"timm:NAME"`` or ``"torchvision:NAME"`` (a ``ModelSource`` or ``{"spec", "kwargs"}``
    adds builder arguments); it is built once here to check that it gives this model's
    tensors. ``data`` records the preprocessing (``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``). The file also records the gated modules and tied
    keys; ``meta`` itself is not changed, and the model carries what was written."""
    if meta is None:
        meta = _own_record(model, source)
    if data:
        meta = with_data(meta, data)
    tensors, aliases = dedupe_shared(model.state_dict())
    recorded = replace(meta, gated=list(gated_modules(model)), aliases=aliases)
    save_tensors(path, tensors, {METADATA_KEY: recorded.to_json()})
    setattr(model, RECORD_ATTR, recorded)
    return Path(path)


def record_of(model) -> CheckpointMeta | None:
    """The record a model was loaded or last saved with, if any."""
    record = getattr(model, RECORD_ATTR, None)
    return record if isinstance(record, CheckpointMeta) else None


def _own_record(model, source: Any) -> CheckpointMeta:
    """The public ``save``'s record: the model's own, or a new one from ``source``."""
    record = record_of(model)
    if source is None and record is None:
        raise CheckpointError(
            "save(): the model carries no record of how to rebuild it (it was not loaded "
            "by gct_surgery.load); pass source='path/to/file.py:factory' (or timm:NAME, "
            "torchvision:NAME, package.module:factory)")
    gate = _gate_config(model)
    if source is None:
        return replace(record, gate=gate or record.gate).with_event("save")
    src = _as_source(source)
    if parse_source(src.spec)[0] not in ("timm", "torchvision", "factory"):
        raise SourceError(f"save(source={src.spec!r}): a source names how to build the model: "
                          "path/to/file.py:factory, package.module:factory, timm:NAME or torchvision:NAME")
    base = build_model(src)  # imports a package, so recordable() can find its folder
    src = recordable(src)
    check_recorded_source(src.to_dict(), f"save(source={src.spec!r})")
    remember(src.spec, src.root)  # the user named it: its files reopen without a flag
    _check_same_tensors(model, base, src.spec)
    if record is None:
        record = CheckpointMeta(source={}, gate={}, gated=[],
                                data=model_data_config(model, parse_source(src.spec)[0]))
    return replace(record, source=src.to_dict(), gate=gate).with_event("save", source=src.spec)


def _as_source(source: Any) -> ModelSource:
    if isinstance(source, ModelSource):
        return ModelSource(source.spec, dict(source.kwargs), root=source.root)
    if isinstance(source, dict):
        return ModelSource(str(source.get("spec", "")), dict(source.get("kwargs") or {}))
    if isinstance(source, (str, os.PathLike)):
        return ModelSource(str(source))
    raise TypeError(f"source should be a string or a ModelSource, not {type(source).__name__}")


def _gate_config(model) -> dict:
    """The gate settings of a model's gates ({} without gates); one setting for all."""
    configs = {(g.mode, g.eps, g.after_relu) for g in gates(model).values()}
    if len(configs) > 1:
        raise CheckpointError("the model's gates were made with different settings "
                              f"({sorted(configs)}); a checkpoint records one")
    if not configs:
        return {}
    mode, eps, after_relu = configs.pop()
    return GateConfig(mode=mode, eps=eps, after_relu=after_relu).__dict__.copy()


def _check_same_tensors(model, base, spec: str) -> None:
    """``base`` (the source's model) must hold the model's tensors, name for name and
    shape for shape, gates aside: else ``load`` would fail, far from here."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_gate_parameter(k)}
    built = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    missing, extra = sorted(set(have) - set(built)), sorted(set(built) - set(have))
    wrong = sorted(k for k in set(have) & set(built) if have[k] != built[k])
    if missing or extra or wrong:
        what = (f"it lacks {missing[0]!r}" if missing else f"it has {extra[0]!r} which this model lacks"
                if extra else f"{wrong[0]!r} is {built[wrong[0]]} there, {have[wrong[0]]} here")
        raise SourceError(f"save(source={spec!r}) builds another model ({what}); pass the source "
                          "this model was built from, with its arguments: "
                          "ModelSource(spec, kwargs={...})")


def with_data(meta: CheckpointMeta, data: dict) -> CheckpointMeta:
    """``meta`` with the preprocessing in ``data`` recorded (checked first): what a user
    gives is no longer listed as assumed."""
    channels = (data.get("input_size") or meta.data.get("input_size") or [None])[0]
    given = check_data(data, channels)
    merged = {**meta.data, **given}
    assumed = [k for k in meta.data.get("assumed", []) if k not in given]
    merged.pop("assumed", None)
    if assumed:
        merged["assumed"] = assumed
    return replace(meta, data=merged)


_DATA_KEYS = ("input_size", *PREPROCESSING_KEYS, "class_names")


def check_data(data: dict, channels: int | None = None) -> dict:
    """A user's preprocessing values, checked and normalised (one mean or std value
    serves every channel); a ``UserError`` names the first bad one."""
    if not isinstance(data, dict):
        raise UserError(f"data should be a dict with keys among {', '.join(_DATA_KEYS)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if key not in _DATA_KEYS:
            raise UserError(f"data: unknown key {key!r}; known keys: {', '.join(_DATA_KEYS)}")
        if key == "input_size":
            size = list(value) if isinstance(value, (list, tuple)) else None
            if not size or len(size) < 2 or not all(isinstance(d, int) and d > 0 for d in size):
                raise UserError(f"data: input_size {value!r} should be channels and spatial sizes, "
                                "e.g. [3, 224, 224]")
            out[key] = size
        elif key in ("mean", "std"):
            values = [value] if isinstance(value, (int, float)) else list(value)
            if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise UserError(f"data: {key} should be numbers, one per input channel")
            if key == "std" and not all(v > 0 for v in values):
                raise UserError("data: std values should be positive")
            if channels and len(values) == 1:
                values = values * channels
            if channels and len(values) != channels:
                raise UserError(f"data: {key} has {len(values)} values for {channels} input channels")
            out[key] = [float(v) for v in values]
        elif key in ("interpolation", "crop_mode"):
            allowed = INTERPOLATIONS if key == "interpolation" else CROP_MODES
            if value not in allowed:
                raise UserError(f"data: {key} {value!r}: choose one of {', '.join(allowed)}")
            out[key] = value
        elif key == "crop_pct":
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UserError(f"data: crop_pct {value!r} should be a fraction in (0, 1]")
            out[key] = float(value)
        else:
            if not isinstance(value, (list, tuple)):
                raise UserError("data: class_names should be a list of names")
            out[key] = [str(c) for c in value]
    return out


@dataclass
class LoadedCheckpoint:
    model: Any
    meta: CheckpointMeta


def rebuild(meta: CheckpointMeta, *, named_by: str = "the checkpoint"):
    """Build the base model a checkpoint names and replay its injection (no weights).
    Code the record names (a factory, ``pickle:``) runs only with the user's consent."""
    source = ModelSource.from_dict(meta.source)
    check_recorded_source(meta.source)  # read_metadata checked it; a meta made in memory may not be
    require(source.spec, root=source.root, named_by=named_by, what="model code")
    model = build_model(source, allow_pickle=True)  # a recorded pickle: consented just above
    if meta.gated:
        try:
            gate = GateConfig(**meta.gate)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint gate config is invalid: {e}") from None
        inject(model, TargetSpec(names=tuple(meta.gated)), gate)
    return model


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Rebuild a model from a gct-surgery checkpoint and load its tensors strictly."""
    meta = read_metadata(path)
    if meta.kind != "full":
        raise CheckpointError(
            f"{path} is a gates-only file; apply it to its base with load(base=..., gates=...)")
    try:
        model = rebuild(meta, named_by=str(path))
    except SourceError as e:  # the model's code is missing here, or fails
        raise SourceError(f"{path}: cannot rebuild its model: {e}") from None
    tensors = restore_aliases(read_tensors(path), meta.aliases)
    load_weights(model, tensors, what=str(path), allow_missing_gates=False)
    model.eval()
    setattr(model, RECORD_ATTR, meta)
    return LoadedCheckpoint(model, meta)
