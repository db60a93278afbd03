"""The gct-surgery checkpoint: one safetensors file that rebuilds itself.

Every tensor is stored under its original name (gates add ``*.gate.*`` keys), so any
safetensors reader can read it. The metadata document (``metadata.CheckpointMeta``)
says how to rebuild the model; ``load_checkpoint`` builds the base, replays the
injection and loads the tensors with strict key checks. ``gct_surgery.load`` is the
public entry point (it also applies gates-only files, ``adapter``).

The header is validated before anything large is allocated: a hostile or corrupt
file costs a clear error, never a huge allocation. See docs/checkpoint-format.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.gate import GateConfig
from ..core.surgery import gated_modules, inject
from ..core.targets import TargetSpec
from ..errors import CheckpointError
from .metadata import METADATA_KEY, CheckpointMeta, check_against_header
from .safetensors_file import dedupe_shared, read_header, read_tensors, restore_aliases, save_tensors
from .source_rules import check_recorded_source
from .sources import ModelSource, build_model
from .state_dicts import load_weights


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """The validated gct-surgery metadata of a checkpoint; an error if it is not one of ours."""
    header, metadata = read_header(path)
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a gct-surgery checkpoint (no "
            f"{METADATA_KEY} metadata): a plain state dict. Make a checkpoint of it with "
            f"`gct-surgery inject {path} --arch timm:NAME -o OUT.safetensors` (--arch names "
            "the architecture it was trained as)")
    meta = CheckpointMeta.from_json(metadata[METADATA_KEY], path)
    check_against_header(meta, header, path)
    return meta


def is_gct_checkpoint(path: str | os.PathLike) -> bool:
    """True for a readable safetensors file that carries gct-surgery metadata."""
    try:
        _, metadata = read_header(path)
    except CheckpointError:
        return False
    return METADATA_KEY in metadata


def save(model, path: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """Save a gated model and its metadata as one self-describing safetensors file.

    The file records the model's gated modules and tied keys; ``meta`` itself is not
    changed."""
    tensors, aliases = dedupe_shared(model.state_dict())
    recorded = replace(meta, gated=list(gated_modules(model)), aliases=aliases)
    save_tensors(path, tensors, {METADATA_KEY: recorded.to_json()})
    return Path(path)


@dataclass
class LoadedCheckpoint:
    model: Any
    meta: CheckpointMeta


def rebuild(meta: CheckpointMeta, *, allow_pickle: bool = False):
    """Build the base model a checkpoint names and replay its injection (no weights)."""
    source = ModelSource.from_dict(meta.source)
    check_recorded_source(meta.source)  # read_metadata checked it; a meta made in memory may not be
    model = build_model(source, allow_pickle=allow_pickle)
    if meta.gated:
        try:
            gate = GateConfig(**meta.gate)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint gate config is invalid: {e}") from None
        inject(model, TargetSpec(names=tuple(meta.gated)), gate)
    return model


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Rebuild a model from a gct-surgery checkpoint and load its tensors strictly."""
    meta = read_metadata(path)
    if meta.kind != "full":
        raise CheckpointError(
            f"{path} is a gates-only file; apply it to its base with load(base=..., gates=...)")
    model = rebuild(meta, allow_pickle=allow_pickle)
    tensors = restore_aliases(read_tensors(path), meta.aliases)
    load_weights(model, tensors, what=str(path), allow_missing_gates=False)
    model.eval()
    return LoadedCheckpoint(model, meta)
