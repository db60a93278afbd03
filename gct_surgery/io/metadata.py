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

from ..core.gate import MODES
from ..errors import CheckpointError
from .sources import check_recorded_source

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
    # Tied keys the file stores once, {dropped: kept}: read from the header, where
    # safetensors' save_model records them (files before it: in this document).
    aliases: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        from .. import __version__

        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
               "gct_surgery_version": __version__, "kind": self.kind,
               "source": self.source, "gate": self.gate, "targets": self.targets,
               "gated": self.gated, "data": self.data, "history": self.history}
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
                   data=check_data(doc.get("data", {}), f"{path}: metadata data"), kind=doc["kind"],
                   base_hash=doc.get("base_hash"), aliases=doc.get("aliases", {}))

    def with_event(self, action: str, **details: Any) -> "CheckpointMeta":
        """A copy with one more history entry, stamped with the UTC time."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return replace(self, history=[*self.history, {"action": action, "time": now, **details}])

    def with_data(self, data: dict) -> "CheckpointMeta":
        """A copy with a user's preprocessing recorded (checked first; one mean or std
        value serves every input channel): what is given is no longer assumed."""
        given = check_data(data)
        channels = (given.get("input_size") or self.data.get("input_size") or [0])[0]
        for key in ("mean", "std"):
            values = given.get(key)
            if values and channels and len(values) != channels:
                if len(values) != 1:
                    raise CheckpointError(f"data.{key} has {len(values)} values for {channels} "
                                          "input channels")
                given[key] = values * channels
        merged = {k: v for k, v in {**self.data, **given}.items() if k != "assumed"}
        assumed = [k for k in self.data.get("assumed", []) if k not in given]
        return replace(self, data={**merged, "assumed": assumed} if assumed else merged)


# --- validation of a document read from a file ----------------------------------------

MAX_NAME_CHARS = 1024
MAX_INPUT_NUMEL = 2**26  # the identity check allocates a batch of this input size
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
_REQUIRED = ("source", "gate", "gated", "kind")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and 0 < len(v) <= 4096 and all(map(_is_number, v))


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


_ANY = (lambda v: True, "")
_DOC_RULES = {  # key: (accepts the value, what it should be)
    "format": _ANY, "format_version": _ANY, "gct_surgery_version": _ANY,
    "kind": (lambda v: v in ("full", "gates-only"), "'full' or 'gates-only'"),
    "source": (lambda v: isinstance(v, dict), "an object"),
    "gate": (lambda v: isinstance(v, dict), "an object"),
    "gated": (lambda v: _strings(v) and len(set(v)) == len(v)
              and all(0 < len(n) <= MAX_NAME_CHARS for n in v), "a list of distinct module names"),
    "targets": (lambda v: isinstance(v, dict), "an object"),
    "data": (lambda v: isinstance(v, dict), "an object"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
                "a list of objects"),
    "aliases": (lambda v: isinstance(v, dict) and _strings([*v, *v.values()]),
                "a map of tensor names"),
    "base_hash": (lambda v: v is None or isinstance(v, str) and len(v) <= 200, "a short string"),
}
_GATE_RULES = {
    "mode": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "eps": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "after_relu": (lambda v: isinstance(v, bool), "true or false"),
}
_DATA_RULES = {
    "input_size": (lambda v: isinstance(v, list) and 2 <= len(v) <= 5
                   and all(_is_int(d) and d > 0 for d in v) and math.prod(v) <= MAX_INPUT_NUMEL,
                   f"channels and spatial sizes, e.g. [3, 224, 224], of at most "
                   f"{MAX_INPUT_NUMEL:,} values"),
    "mean": (_numbers, "numbers, one per input channel"),
    "std": (lambda v: _numbers(v) and all(x > 0 for x in v),
            "positive numbers, one per input channel"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
    "crop_mode": (lambda v: v in CROP_MODES, f"one of {', '.join(CROP_MODES)}"),
    "crop_pct": (lambda v: _is_number(v) and 0 < v <= 4, "a number in (0, 4], e.g. 0.875"),
    "class_names": (_strings, "a list of names"),
    "assumed": (lambda v: _strings(v) and set(v) <= set(PREPROCESSING_KEYS),
                f"a list of preprocessing keys ({', '.join(PREPROCESSING_KEYS)})"),
}


def _checked(values: Any, rules: dict, where: str) -> dict:
    """``values`` once every key is known to ``rules`` and every value accepted; else a
    ``CheckpointError`` naming the first that is not."""
    for key, value in values.items():
        if key not in rules:
            raise CheckpointError(f"{where}: unknown key {key!r:.40}; known keys: "
                                  f"{', '.join(rules)}")
        if not rules[key][0](value):
            raise CheckpointError(f"{where}.{key} {value!r:.60} should be {rules[key][1]}")
    return values


def _check_document(doc: Any, path: str | os.PathLike) -> None:
    """Raise a ``CheckpointError`` naming the first thing wrong with a metadata document."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: metadata is not gct-surgery's (no \"format\": "
                              f"\"{FORMAT_NAME}\")")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: metadata has no valid format_version (a positive integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was made by a newer gct-surgery (format {version}, this one reads "
            f"up to {FORMAT_VERSION}); upgrade gct-surgery")
    missing = next((key for key in _REQUIRED if doc.get(key) is None), None)
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing!r}")
    _checked(doc, _DOC_RULES, f"{path}: metadata")
    _checked(doc["gate"], _GATE_RULES, f"{path}: metadata gate")
    check_recorded_source(doc["source"], str(path))
    for event in doc.get("history") or []:  # a gates-only file rebuilds its base from "open"
        is_open = event.get("action") == "open"
        opened = [event.get("source"), event.get("weights")] if is_open else []
        if not _strings([v for v in opened if v is not None]):
            raise CheckpointError(f"{path}: metadata history 'open' source and weights should be "
                                  "strings")
        if opened and opened[0] is not None:
            check_recorded_source({"spec": opened[0]}, str(path), base=True)


def check_data(data: Any, where: str = "data") -> dict:
    """Preprocessing values (a user's, or a file's: ``where`` says which), checked to be
    what timm's transforms accept, so a bad one is a message here rather than a crash in
    a data loader; tuples become lists and one mean or std number a list of one."""
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if v is not None}
    data.update({k: [data[k]] for k in ("mean", "std") if _is_number(data.get(k))})
    checked = _checked(data, _DATA_RULES, where)
    return {k: [float(x) for x in v] if k in ("mean", "std") else v for k, v in checked.items()}


def check_against_header(meta: CheckpointMeta, shapes: dict[str, list[int]],
                         path: str | os.PathLike) -> None:
    """Metadata and tensors must tell the same story, so nothing is built for a lie:
    every gated module has its gate tensors, and a recorded class or channel count
    matches a stored shape."""
    for name in meta.gated:
        key = f"{name}.gate.gamma"
        if key not in shapes and meta.aliases.get(key) not in shapes:
            raise CheckpointError(f"{path}: metadata gates {name!r:.80} but the file has no "
                                  f"{key!r:.100} tensor")
    kwargs = (meta.source.get("kwargs") or {}) if meta.kind == "full" else {}
    classes = kwargs.get("num_classes")  # the builder would allocate a head of that many rows
    # a multiple: a detection head has anchors x classes rows
    if _is_int(classes) and classes > 0 and not any(s and s[0] >= classes and s[0] % classes == 0
                                                    for s in shapes.values()):
        raise CheckpointError(f"{path}: metadata says num_classes={classes} but no stored tensor "
                              "has that many rows")
