"""The gct-surgery checkpoint: one safetensors file that rebuilds itself.

Every tensor is stored under its original name (gates add ``*.gate.*`` keys), so any
safetensors reader can read it; ``safetensors.torch.save_model`` writes it, tied
weights included (it stores a shared tensor once and records the dropped name in the
header, which loading maps back). The metadata document
(``metadata.CheckpointMeta``) says how to rebuild the model; ``load_checkpoint``
validates it against the header before anything is built, builds the base, replays the
injection and loads the tensors with strict key checks. ``gct_surgery.load`` is the
public entry point (it also applies gates-only files, ``adapter``).

A loaded (or saved) model carries its record (``RECORD_ATTR``), so a user's own loop can
load, train and ``save(model, path)`` without handling metadata; a model the user
built themselves gets a record from ``save(..., source=...)``. See
docs/checkpoint-format.md.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..core.gate import GateConfig
from ..core.surgery import gated_modules, gates, inject, is_gate_parameter
from ..core.targets import TargetSpec
from ..errors import CheckpointError, SourceError, first_line
from .atomic import atomic_path
from .metadata import METADATA_KEY, CheckpointMeta, check_against_header
from .sources import (ModelSource, build_model, check_recorded_source, model_data_config,
                      parse_source, recordable, timm_hub)
from .state_dicts import (STATE_DICT_SUFFIXES, is_safetensors, load_weights, read_header,
                          read_tensors)
from .trust import remember, require

RECORD_ATTR = "_gct_record"  # the CheckpointMeta a model was loaded or saved with
RUN_CHECKPOINTS = ("best.safetensors", "last.safetensors", "ema.safetensors")  # what a run writes


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """The validated gct-surgery metadata of a checkpoint; an error if it is not one of
    ours, saying the command that makes one (or, for a run folder, the file in it)."""
    path = Path(path)
    hint = run_folder_hint(path)
    if hint:
        raise CheckpointError(hint)
    shapes, metadata = read_header(path, then=f": first {_make_one(path)}")
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a gct-surgery checkpoint (no {METADATA_KEY} "
            f"metadata): a plain state dict. Make a checkpoint of it with {_make_one(path)}")
    meta = CheckpointMeta.from_json(metadata[METADATA_KEY], path)
    tied = {k: v for k, v in metadata.items() if k != METADATA_KEY and v in shapes}  # save_model's
    meta = replace(meta, aliases={**meta.aliases, **tied})
    check_against_header(meta, shapes, path)
    return meta


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A safetensors file with gct-surgery metadata (damaged or not: ``load_checkpoint``
    then says what is wrong), rather than another trainer's weights."""
    return is_safetensors(path) and METADATA_KEY in read_header(path)[1]


def _make_one(path: Path) -> str:
    return (f"`gct-surgery inject {path} --arch timm:NAME` (a timm train.py checkpoint names "
            f"its own), then use the {default_checkpoint_name(str(path))} it writes")


def run_folder_hint(path: Path) -> str | None:
    """A run folder where a checkpoint file belongs: the file in it to give instead."""
    found = [path / n for n in RUN_CHECKPOINTS if (path / n).is_file()] if path.is_dir() else []
    if not found:
        return None
    rest = f" (or {', '.join(map(str, found[1:]))})" if len(found) > 1 else ""
    return f"{path} is a run folder, not a checkpoint: use {found[0]}{rest}"


def default_checkpoint_name(source: str) -> Path:
    """The gated checkpoint's name for a SOURCE: ``model.pth.tar`` ->
    ``model.gct.safetensors`` beside it; ``timm:resnet18`` -> ``resnet18.gct.safetensors``
    (``hf-hub:org/name``'s name, a ``local-dir``'s folder name) in the current folder."""
    kind, location = parse_source(source)
    if kind in ("file", "pickle"):
        path = Path(location)
        name = path.name
        while Path(name).suffix in (".tar", *STATE_DICT_SUFFIXES) and Path(name).stem:
            name = Path(name).stem
        return path.with_name(f"{name}.gct.safetensors")
    if kind == "factory":
        return Path(f"{location.rpartition(':')[2]}.gct.safetensors")
    hub = timm_hub(source)
    name = Path((hub[1] if hub else location).rstrip("/\\").split("@")[0]).name
    return Path(f"{name or 'model'}.gct.safetensors")


# --- saving ---------------------------------------------------------------------------

def save(model, path: str | os.PathLike, meta: CheckpointMeta | None = None, *,
         source: Any = None, data: dict | None = None) -> Path:
    """Save a (gated) model, atomically, as one self-describing safetensors file that
    ``load`` rebuilds.

    The record is ``meta`` if given, else the one the model carries (``load`` returned
    it, or it was saved before), else a new one from ``source``: how to rebuild the
    model, ``"path/to/file.py:factory"``, ``"package.module:factory"``,
    ``"timm:NAME"`` or ``"torchvision:NAME"`` (a ``ModelSource`` adds builder
    arguments); it is built once here to check that it takes this model's tensors.
    ``data`` records the preprocessing (``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``). ``meta`` itself is not changed, and the model
    carries what was written."""
    meta = _own_record(model, source) if meta is None else meta
    with atomic_path(path) as tmp:
        recorded = write_checkpoint(model, tmp, meta.with_data(data) if data else meta)
    setattr(model, RECORD_ATTR, recorded)
    return Path(path)


def write_checkpoint(model, path: str | os.PathLike, meta: CheckpointMeta) -> CheckpointMeta:
    """Write the checkpoint file itself (the caller's atomic write holds ``path``); the
    record written, with the model's gated modules."""
    from safetensors.torch import save_model

    recorded = replace(meta, gated=list(gated_modules(model)), aliases={})
    try:
        save_model(model, str(path), {METADATA_KEY: recorded.to_json()}, force_contiguous=True)
    except (RuntimeError, ValueError) as e:  # e.g. a tensor that views part of another
        raise CheckpointError(f"cannot save this model as safetensors: "
                              f"{first_line(e)[:300]}") from None
    return recorded


def _own_record(model, source: Any) -> CheckpointMeta:
    """The public ``save``'s record: the model's own, or a new one from ``source``."""
    record = getattr(model, RECORD_ATTR, None)  # the one it was loaded or last saved with
    if source is None and record is None:
        raise CheckpointError(
            "save(): the model carries no record of how to rebuild it (it was not loaded "
            "by gct_surgery.load); pass source='path/to/file.py:factory' (or timm:NAME, "
            "torchvision:NAME, package.module:factory)")
    gate = _gate_config(model)
    if source is None:
        return replace(record, gate=gate or record.gate).with_event("save")
    src = source if isinstance(source, ModelSource) else ModelSource(os.fspath(source))
    base = build_model(src)  # imports a package, so recordable() can find its folder
    src = recordable(src)
    check_recorded_source(src.to_dict(), f"save(source={src.spec!r})")
    remember(src.spec, src.root)  # the user named it: its files reopen without a flag
    _check_same_tensors(model, base, src.spec)
    if record is None:
        record = CheckpointMeta(source={}, gate={}, gated=[],
                                data=model_data_config(model, parse_source(src.spec)[0]))
    return replace(record, source=src.to_dict(), gate=gate).with_event("save", source=src.spec)


def _gate_config(model) -> dict:
    """The gate settings of a model's gates ({} without gates); one setting for all."""
    configs = {(g.mode, g.eps, g.after_relu) for g in gates(model).values()}
    if len(configs) > 1:
        raise CheckpointError("the model's gates were made with different settings "
                              f"({sorted(configs)}); a checkpoint records one")
    if not configs:
        return {}
    return asdict(GateConfig(*configs.pop()))


def _check_same_tensors(model, base, spec: str) -> None:
    """``base`` (the source's model) must take the model's tensors, gates aside: else
    ``load`` would fail, far from here."""
    try:
        load_weights(base, base_state(model), what="this model's weights")
    except CheckpointError as e:
        raise SourceError(f"save(source={spec!r}) builds another model ({e}); pass the source "
                          "this model was built from, with its arguments: "
                          "ModelSource(spec, kwargs={...})") from None


def base_state(model) -> dict:
    """The base weights of a model: its state dict without gate tensors."""
    return {k: v for k, v in model.state_dict().items() if not is_gate_parameter(k)}


# --- loading --------------------------------------------------------------------------

@dataclass
class LoadedCheckpoint:
    model: Any
    meta: CheckpointMeta


def rebuild(meta: CheckpointMeta, *, named_by: str = "the checkpoint"):
    """Build the base model a checkpoint names and replay its injection (no weights).
    Code the record names (a factory, ``pickle:``) runs only with the user's consent."""
    source = ModelSource.from_dict(meta.source)
    require(source.spec, root=source.root, named_by=named_by, what="model code")
    model = build_model(source, allow_pickle=True)  # a recorded pickle: consented just above
    if meta.gated:  # meta.gate was validated with the document
        inject(model, TargetSpec(names=tuple(meta.gated)), GateConfig(**meta.gate))
    return model


def stored_tensors(path: str | os.PathLike, meta: CheckpointMeta) -> dict:
    """A checkpoint's tensors under every name, a tied key's under each of its names."""
    tensors = read_tensors(path)
    tensors.update({dropped: tensors[kept] for dropped, kept in meta.aliases.items()
                    if kept in tensors})
    return tensors


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Rebuild a model from a gct-surgery checkpoint and load its tensors strictly (a
    tied weight, stored once, into the one tensor its names share)."""
    meta = read_metadata(path)
    if meta.kind != "full":
        raise CheckpointError(
            f"{path} is a gates-only file; apply it to its base with load(base=..., gates=...)")
    try:
        model = rebuild(meta, named_by=str(path))
    except SourceError as e:  # the model's code is missing here, or fails
        raise SourceError(f"{path}: cannot rebuild its model: {e}") from None
    load_weights(model, stored_tensors(path, meta), what=str(path), allow_missing_gates=False)
    model.eval()
    setattr(model, RECORD_ATTR, meta)
    return LoadedCheckpoint(model, meta)
