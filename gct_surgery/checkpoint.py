"""The gct-surgery checkpoint: one safetensors file that rebuilds itself.

Every tensor is stored under its original name (gates add ``*.gate.*`` keys), so any
safetensors reader can read it. One JSON document under the header metadata key
``gct_surgery`` says how to rebuild the model: the base source, the gate config, the
gated module names and a history of what was done. ``load`` builds the base, replays
the injection and loads the tensors with strict key checks.

The header is validated before anything large is allocated: a hostile or corrupt
file costs a clear error, never a huge allocation. See docs/checkpoint-format.md.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

FORMAT_NAME = "gct-surgery"
FORMAT_VERSION = 1
METADATA_KEY = "gct_surgery"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass
class CheckpointMeta:
    """The JSON document stored in the header. ``kind`` is 'full' or 'gates-only'."""

    source: dict
    gate: dict
    gated: list[str]
    targets: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # input size, normalisation, class names
    kind: str = "full"
    base_hash: str | None = None  # gates-only files: the hash of the base they apply to
    aliases: dict[str, str] = field(default_factory=dict)  # tied keys dropped -> kept
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        from . import __version__

        doc = {"format": FORMAT_NAME, "format_version": self.format_version,
               "gct_surgery_version": __version__, "kind": self.kind,
               "source": self.source, "gate": self.gate, "targets": self.targets,
               "gated": self.gated, "data": self.data, "history": self.history,
               "aliases": self.aliases}
        if self.base_hash:
            doc["base_hash"] = self.base_hash
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str | os.PathLike = "checkpoint") -> "CheckpointMeta":
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise CheckpointError(f"{path}: gct-surgery metadata is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{path}: metadata is not gct-surgery's")
        version = doc.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{path}: metadata has no integer format_version")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was made by a newer gct-surgery (format {version}, this one reads "
                f"up to {FORMAT_VERSION}); upgrade gct-surgery")
        schema = {"source": dict, "gate": dict, "gated": list, "targets": dict,
                  "history": list, "data": dict, "kind": str, "aliases": dict}
        for key, typ in schema.items():
            if key in ("source", "gate", "gated", "kind") and key not in doc:
                raise CheckpointError(f"{path}: metadata lacks {key!r}")
            if key in doc and not isinstance(doc[key], typ):
                raise CheckpointError(f"{path}: metadata {key!r} should be a {typ.__name__}")
        if not all(isinstance(n, str) for n in doc["gated"]):
            raise CheckpointError(f"{path}: metadata 'gated' must list module names")
        if doc["kind"] not in ("full", "gates-only"):
            raise CheckpointError(f"{path}: unknown checkpoint kind {doc['kind']!r}")
        return cls(source=doc["source"], gate=doc["gate"], gated=doc["gated"],
                   targets=doc.get("targets", {}), history=doc.get("history", []),
                   data=doc.get("data", {}), kind=doc["kind"],
                   base_hash=doc.get("base_hash"), aliases=doc.get("aliases", {}),
                   format_version=version)

    def with_event(self, action: str, **details: Any) -> "CheckpointMeta":
        """A copy with one more history entry, stamped with the UTC time."""
        event = {"action": action, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        event.update(details)
        copy = CheckpointMeta(**{**self.__dict__, "history": [*self.history, event]})
        return copy


# --- the header ----------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read and validate a safetensors header: ``(tensor_entries, metadata)``.

    Checks the header size, the JSON, every dtype, shape and offset against the file
    size, before a single tensor byte is read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or n > size - 8 or n < 2:
            raise CheckpointError(f"{path} is not a safetensors file (bad header size {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
        spans.append(tuple(entry["data_offsets"]))
    spans.sort()
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors overlap in the data section")
    return header, metadata


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_SIZES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not (0 <= begin <= end <= data_size) or end - begin != numel * _DTYPE_SIZES[dtype]:
        raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """The gct-surgery metadata of a checkpoint; an error if it is not one of ours."""
    _, metadata = read_header(path)
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a gct-surgery checkpoint "
            "(no gct_surgery metadata); for a plain state dict, pass --arch")
    return CheckpointMeta.from_json(metadata[METADATA_KEY], path)


def is_gct_checkpoint(path: str | os.PathLike) -> bool:
    try:
        _, metadata = read_header(path)
    except CheckpointError:
        return False
    return METADATA_KEY in metadata


def read_tensors(path: str | os.PathLike) -> dict:
    """Every tensor of a validated safetensors file, on the CPU."""
    from safetensors.torch import load_file

    read_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: unreadable safetensors data ({e})") from None


# --- save and load ---------------------------------------------------------------

def dedupe_shared(state_dict: dict) -> tuple[dict, dict[str, str]]:
    """Drop keys whose tensor is another key's (tied weights); safetensors refuses
    shared storage. Returns ``(tensors, {dropped: kept})``."""
    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for k, v in state_dict.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and ident in kept:
            aliases[k] = kept[ident]
            continue
        kept[ident] = k
        tensors[k] = v.detach().contiguous()
    return tensors, aliases


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """Write tensors atomically: a temp file beside ``path``, fsync, rename."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    tensors, _ = dedupe_shared(tensors)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save(model, path: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """Save a gated model and its metadata as one self-describing safetensors file."""
    from .surgery import gated_modules

    tensors, aliases = dedupe_shared(model.state_dict())
    meta.gated = list(gated_modules(model))
    meta.aliases = aliases
    save_tensors(path, tensors, {METADATA_KEY: meta.to_json()})
    return Path(path)


@dataclass
class LoadedCheckpoint:
    model: Any
    meta: CheckpointMeta


def rebuild(meta: CheckpointMeta, *, allow_pickle: bool = False):
    """Build the base model a checkpoint names and replay its injection (no weights)."""
    from .gate import GateConfig
    from .sources import ModelSource, build_model
    from .surgery import inject
    from .targets import TargetSpec

    model = build_model(ModelSource.from_dict(meta.source), allow_pickle=allow_pickle)
    if meta.gated:
        try:
            gate = GateConfig(**meta.gate)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint gate config is invalid: {e}") from None
        inject(model, TargetSpec(names=tuple(meta.gated)), gate)
    return model


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Rebuild a model from a gct-surgery checkpoint and load its tensors strictly."""
    from .sources import load_weights

    meta = read_metadata(path)
    if meta.kind != "full":
        raise CheckpointError(
            f"{path} is a gates-only file; apply it to its base with load(base=..., gates=...)")
    model = rebuild(meta, allow_pickle=allow_pickle)
    tensors = read_tensors(path)
    for dropped, kept in meta.aliases.items():
        if kept in tensors:
            tensors[dropped] = tensors[kept]
    load_weights(model, tensors, what=str(path), allow_missing_gates=False)
    model.eval()
    return LoadedCheckpoint(model, meta)


def load(path: str | os.PathLike | None = None, *, base=None, gates=None, allow_pickle: bool = False):
    """Load a gct-surgery checkpoint as a ready ``nn.Module`` (in eval mode).

    ``load("model.safetensors")`` rebuilds the full model.
    ``load(base=..., gates="gates.safetensors")`` applies a gates-only file to its base
    (an ``nn.Module``, a SOURCE or a weights file; by default the recorded base) and
    refuses a base whose weights differ from the one the file was made from.
    """
    if gates is not None:
        if path is not None:
            raise TypeError("load() takes either a checkpoint path or base=/gates=, not both")
        from .adapter import apply_adapter

        return apply_adapter(gates, base, allow_pickle=allow_pickle)
    if path is None:
        raise TypeError("load() needs a checkpoint path, or gates= (and base=)")
    return load_checkpoint(path, allow_pickle=allow_pickle).model
