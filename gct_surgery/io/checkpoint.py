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
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

FORMAT_NAME = "gct-surgery"
FORMAT_VERSION = 1
METADATA_KEY = "gct_surgery"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit
MAX_DIMS = 16

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
        copy = CheckpointMeta(**{**self.__dict__, "history": [*self.history, event]})
        return copy


# --- the header ----------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read and validate a safetensors header: ``(tensor_entries, metadata)``.

    Checks the header size, the JSON, every dtype, shape and offset against the file
    size, and that the tensors tile the data section exactly (as the safetensors
    reference does), before a single tensor byte is read.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {len(prefix)} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8 or n < 2:
                raise CheckpointError(f"{path} is not a safetensors file ({_what_instead(prefix, n, size)})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) != n:
        raise CheckpointError(f"{path} changed while it was read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):  # bad UTF-8, bad JSON, duplicate keys, absurd nesting
        raise CheckpointError(f"{path} is not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(path, name, entry, data_size), name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            problem = "overlaps another" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} {problem} in the data section")
        end = stop
    if end != data_size:
        raise CheckpointError(f"{path}: the data section has {data_size - end} bytes no tensor "
                              "accounts for (truncated or padded file)")
    return header, metadata


def _what_instead(prefix: bytes, n: int, size: int) -> str:
    """Why the first 8 bytes are not a safetensors header size, in the user's terms."""
    if prefix[:4] == _ZIP_MAGIC:
        return "it is a torch.save zip file; a plain state dict goes with --arch"
    if 2 <= n <= MAX_HEADER_BYTES:
        return f"the header claims {n} bytes, the file has {size}: truncated?"
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a pickle; a plain state dict goes with --arch"
    return f"bad header size {n}"


def _no_duplicate_keys(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """Validate one tensor entry and return its ``(begin, end)`` in the data section."""
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: header entry {name!r:.80} is not a tensor description")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise CheckpointError(f"{path}: tensor {name!r:.80} has unknown dtype {dtype!r:.40}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d < 2**40 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r:.80} has a bad shape {shape!r:.80}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r:.80} has bad data_offsets")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not (0 <= begin <= end <= data_size):
        raise CheckpointError(f"{path}: tensor {name!r:.80} lies outside the file (offsets "
                              f"{begin}..{end}, data section {data_size} bytes)")
    if end - begin != numel * _DTYPE_SIZES[dtype]:
        raise CheckpointError(f"{path}: tensor {name!r:.80} has {end - begin} bytes, its "
                              f"{dtype} shape {shape} needs {numel * _DTYPE_SIZES[dtype]}")
    return begin, end


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- the metadata document ---------------------------------------------------------

_FIELD_TYPES = {"source": dict, "gate": dict, "gated": list, "targets": dict,
                "history": list, "data": dict, "kind": str, "aliases": dict}
_REQUIRED = ("source", "gate", "gated", "kind")
_GATE_FIELDS = {"mode": str, "eps": float, "after_relu": bool}
MAX_NAME_CHARS = 1024
MAX_INPUT_NUMEL = 2**26  # the identity check allocates a batch of this input size


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
    from .sources import check_recorded_source

    check_recorded_source(doc["source"], str(path))
    aliases = doc.get("aliases", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: metadata 'aliases' must map tensor names to tensor names")
    base_hash = doc.get("base_hash")
    if base_hash is not None and not (isinstance(base_hash, str) and len(base_hash) <= 200):
        raise CheckpointError(f"{path}: metadata 'base_hash' should be a short string")
    for event in doc.get("history", []):
        _check_event(event, path, check_recorded_source)
    _check_data(doc.get("data", {}), path)


def _check_gate(gate: dict, path: str | os.PathLike) -> None:
    from ..core.gate import MODES

    for key, value in gate.items():
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


def _check_event(event: Any, path: str | os.PathLike, check_recorded_source) -> None:
    if not isinstance(event, dict):
        raise CheckpointError(f"{path}: metadata 'history' entries should be objects")
    if event.get("action") == "open":  # gates-only files rebuild their base from it
        source = event.get("source")
        if source is not None:
            if not isinstance(source, str):
                raise CheckpointError(f"{path}: metadata history 'open' source should be a string")
            check_recorded_source({"spec": source}, str(path))
        weights = event.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise CheckpointError(f"{path}: metadata history 'open' weights should be a path")


def _check_data(data: dict, path: str | os.PathLike) -> None:
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


def _check_against_header(meta: CheckpointMeta, header: dict, path: str | os.PathLike) -> None:
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
    _check_against_header(meta, header, path)
    return meta


def is_gct_checkpoint(path: str | os.PathLike) -> bool:
    """True for a readable safetensors file that carries gct-surgery metadata."""
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
    except Exception as e:  # safetensors raises its own SafetensorError; torch may lack a dtype
        raise CheckpointError(f"{path}: unreadable safetensors data ({type(e).__name__}: "
                              f"{str(e).strip()[:200]})") from None


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
    from ..core.surgery import gated_modules

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
    from ..core.gate import GateConfig
    from .sources import ModelSource, build_model
    from ..core.surgery import inject
    from ..core.targets import TargetSpec

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
