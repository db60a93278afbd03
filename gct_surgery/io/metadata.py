"""The gct-surgery metadata document: ``CheckpointMeta``, its JSON and its validation.

One JSON document under the safetensors metadata key ``gct_surgery`` says how to
rebuild a model: the base source, the gate config, the gated module names and a history
of what was done. A file may be hostile and these values decide what code runs and
what is allocated, so every field is checked on reading. ``CheckpointMeta`` is frozen:
a change is a new copy (``dataclasses.replace``), so no caller's record changes under it.
See docs/checkpoint-format.md.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import CheckpointError
from .source_rules import check_recorded_source

FORMAT_NAME = "gct-surgery"
FORMAT_VERSION = 1
METADATA_KEY = "gct_surgery"


@dataclass(frozen=True)
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
        from .. import __version__

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
        """Parse and validate the metadata document. Every field is checked: the file
        may be hostile, and these values decide what code runs and what is allocated."""
        try:
            doc = json.loads(text)
        except (ValueError, TypeError, RecursionError):  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path}: gct-surgery metadata is not valid JSON") from None
        _check_document(doc, path)
        return cls(source=doc["source"], gate=doc["gate"], gated=doc["gated"],
                   targets=doc.get("targets", {}), history=doc.get("history", []),
                   data=doc.get("data", {}), kind=doc["kind"],
                   base_hash=doc.get("base_hash"), aliases=doc.get("aliases", {}),
                   format_version=doc["format_version"])

    def with_event(self, action: str, **details: Any) -> "CheckpointMeta":
        """A copy with one more history entry, stamped with the UTC time."""
        event = {"action": action, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        event.update(details)
        return replace(self, history=[*self.history, event])


# --- validation of a document read from a file ----------------------------------------

_FIELD_TYPES = {"source": dict, "gate": dict, "gated": list, "targets": dict,
                "history": list, "data": dict, "kind": str, "aliases": dict}
_REQUIRED = ("source", "gate", "gated", "kind")
_GATE_FIELDS = {"mode": str, "eps": float, "after_relu": bool}
MAX_NAME_CHARS = 1024
MAX_INPUT_NUMEL = 2**26  # the identity check allocates a batch of this input size


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_document(doc: Any, path: str | os.PathLike) -> None:
    """Raise a ``CheckpointError`` naming the first thing wrong with a metadata document."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: metadata is not gct-surgery's (no \"format\": \"{FORMAT_NAME}\")")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: metadata has no valid format_version (a positive integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was made by a newer gct-surgery (format {version}, this one reads "
            f"up to {FORMAT_VERSION}); upgrade gct-surgery")
    for key in _REQUIRED:
        if key not in doc:
            raise CheckpointError(f"{path}: metadata lacks {key!r}")
    for key, typ in _FIELD_TYPES.items():
        if key in doc and not isinstance(doc[key], typ):
            raise CheckpointError(f"{path}: metadata {key!r} should be a {typ.__name__}")
    if doc["kind"] not in ("full", "gates-only"):
        raise CheckpointError(f"{path}: unknown checkpoint kind {doc['kind']!r:.40} "
                              "(expected 'full' or 'gates-only')")
    gated = doc["gated"]
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in gated):
        raise CheckpointError(f"{path}: metadata 'gated' must list module names")
    if len(set(gated)) != len(gated):
        raise CheckpointError(f"{path}: metadata 'gated' names a module twice")
    _check_gate(doc["gate"], path)
    check_recorded_source(doc["source"], str(path))
    aliases = doc.get("aliases", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: metadata 'aliases' must map tensor names to tensor names")
    base_hash = doc.get("base_hash")
    if base_hash is not None and not (isinstance(base_hash, str) and len(base_hash) <= 200):
        raise CheckpointError(f"{path}: metadata 'base_hash' should be a short string")
    for event in doc.get("history", []):
        _check_event(event, path)
    _check_data(doc.get("data", {}), path)


def _check_gate(gate: dict, path: str | os.PathLike) -> None:
    from ..core.gate import MODES

    for key in gate:
        if key not in _GATE_FIELDS:
            raise CheckpointError(f"{path}: metadata 'gate' has unknown field {key!r:.40}")
    mode = gate.get("mode", "l2")
    if mode not in MODES:
        raise CheckpointError(f"{path}: metadata gate mode {mode!r:.40} is unknown "
                              f"(expected one of {', '.join(MODES)})")
    eps = gate.get("eps", 1e-5)
    if not _is_number(eps) or not 0 < eps <= 1:
        raise CheckpointError(f"{path}: metadata gate eps {eps!r:.40} should be a number in (0, 1]")
    if not isinstance(gate.get("after_relu", False), bool):
        raise CheckpointError(f"{path}: metadata gate after_relu should be true or false")


def _check_event(event: Any, path: str | os.PathLike) -> None:
    if not isinstance(event, dict):
        raise CheckpointError(f"{path}: metadata 'history' entries should be objects")
    if event.get("action") == "open":  # gates-only files rebuild their base from it
        source = event.get("source")
        if source is not None:
            if not isinstance(source, str):
                raise CheckpointError(f"{path}: metadata history 'open' source should be a string")
            check_recorded_source({"spec": source}, str(path), base=True)
        weights = event.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise CheckpointError(f"{path}: metadata history 'open' weights should be a path")


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def _check_data(data: dict, path: str | os.PathLike) -> None:
    """The preprocessing record: values timm's transforms accept, so a bad one is a
    message here rather than a crash in a data loader."""
    size = data.get("input_size")
    if size is not None:
        numel = 1
        ok = isinstance(size, list) and 2 <= len(size) <= 5 and all(_is_int(d) and 0 < d for d in size)
        if ok:
            for d in size:
                numel *= d
        if not ok or numel > MAX_INPUT_NUMEL:
            raise CheckpointError(f"{path}: metadata data.input_size {size!r:.60} should be a list "
                                  f"of positive sizes of at most {MAX_INPUT_NUMEL:,} values")
    for key in ("mean", "std"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and 0 < len(value) <= 4096
                                      and all(_is_number(v) for v in value)):
            raise CheckpointError(f"{path}: metadata data.{key} should be a list of numbers")
    if data.get("std") is not None and not all(v > 0 for v in data["std"]):
        raise CheckpointError(f"{path}: metadata data.std should be positive")
    choices = {"interpolation": INTERPOLATIONS, "crop_mode": CROP_MODES}
    for key, allowed in choices.items():
        if data.get(key) is not None and data[key] not in allowed:
            raise CheckpointError(f"{path}: metadata data.{key} {data[key]!r:.40} should be one "
                                  f"of {', '.join(allowed)}")
    crop = data.get("crop_pct")
    if crop is not None and not (_is_number(crop) and 0 < crop <= 4):
        raise CheckpointError(f"{path}: metadata data.crop_pct should be a number in (0, 4]")
    assumed = data.get("assumed", [])
    if not (isinstance(assumed, list) and all(k in PREPROCESSING_KEYS for k in assumed)):
        raise CheckpointError(f"{path}: metadata data.assumed should list preprocessing keys "
                              f"({', '.join(PREPROCESSING_KEYS)})")


def check_against_header(meta: CheckpointMeta, header: dict, path: str | os.PathLike) -> None:
    """Metadata and tensors must tell the same story, so nothing is built for a lie:
    every gated module has its gate tensors, aliases point at stored tensors, and a
    recorded class or channel count matches a stored shape."""
    stored = set(header)
    for name in meta.gated:
        key = f"{name}.gate.gamma"
        if key not in stored and key not in meta.aliases:
            raise CheckpointError(f"{path}: metadata gates {name!r:.80} but the file has no "
                                  f"{key!r:.100} tensor")
    for dropped, kept in meta.aliases.items():
        if kept not in stored or dropped in stored:
            raise CheckpointError(f"{path}: metadata alias {dropped!r:.80} -> {kept!r:.80} does not "
                                  "match the stored tensors")
    if meta.kind != "full":
        return
    kwargs = meta.source.get("kwargs") or {}
    shapes = [entry["shape"] for entry in header.values()]
    classes = kwargs.get("num_classes")
    if _is_int(classes) and classes > 0 and not any(s and s[0] == classes for s in shapes):
        raise CheckpointError(f"{path}: metadata says num_classes={classes} but no stored tensor "
                              "has that many rows")
    # data.input_size is bounded by _check_data; it need not match a stored weight (a
    # model may start with a fixed transform held in buffers, as timm's CSATv2 does).
    chans = kwargs.get("in_chans")
    if _is_int(chans) and chans > 0 and not any(len(s) >= 3 and s[1] == chans for s in shapes):
        raise CheckpointError(f"{path}: metadata says in_chans={chans} but no stored conv weight "
                              "takes that many channels")
