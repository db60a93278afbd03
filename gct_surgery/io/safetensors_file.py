"""Safetensors files: what a path holds, its validated header, its tensors.

``safetensors.safe_open`` (the format's own reader) decides whether a header is valid,
so every dtype the format knows is accepted. This module adds only what safe_open
leaves out: naming a torch zip, a pickle or a truncated file as such, refusing
duplicate JSON keys and unknown entry fields, and saying in one line a user can act on
what is wrong. The header passes before any tensor byte is read.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointError, first_line
from .atomic import atomic_path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit
ZIP_MAGIC = b"PK\x03\x04"
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

FileKind = Literal["safetensors", "torch-zip", "pickle", "unknown"]


def sniff(path: str | os.PathLike) -> FileKind:
    """What a file holds by its first bytes, whatever its name says."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    return _kind_of(head)


def _kind_of(head: bytes) -> FileKind:
    if len(head) >= 9 and head[8:9] == b"{":  # a header size, then the JSON header
        return "safetensors"
    if head[:4] == ZIP_MAGIC:
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO n
        return "pickle"
    return "unknown"


def is_safetensors(path: str | os.PathLike) -> bool:
    """By content, or by a .safetensors name when the content says nothing else (a
    gct-surgery checkpoint renamed to .pt is still one; a torch file named .safetensors
    is not)."""
    kind = sniff(path)
    return kind == "safetensors" or (kind == "unknown" and Path(path).suffix == ".safetensors")


# --- the header ----------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The validated header of a safetensors file: ``(tensor_entries, metadata)``."""
    path = Path(path)
    raw, data_size = _raw_header(path)
    header, metadata = _parse(path, raw)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):  # parses and checks the header only
            pass
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(_explain(path, header, data_size, e)) from None
    return header, metadata


def _raw_header(path: Path) -> tuple[bytes, int]:
    """The header's bytes and the data section's size, after the size field is checked
    against the file (a zip, pickle or truncated file is named here)."""
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
    return raw, size - 8 - n


def _what_instead(prefix: bytes, n: int, size: int) -> str:
    """Why the first 8 bytes are not a safetensors header size, in the user's terms."""
    kind = _kind_of(prefix)
    if kind == "torch-zip":
        return "it is a torch.save zip file; a plain state dict goes with --arch"
    if 2 <= n <= MAX_HEADER_BYTES:
        return f"the header claims {n} bytes, the file has {size}: truncated?"
    if kind == "pickle":
        return "it is a pickle; a plain state dict goes with --arch"
    return f"bad header size {n}"


def _parse(path: Path, raw: bytes) -> tuple[dict, dict[str, str]]:
    """The header JSON, with what safe_open lets through refused: duplicate keys (two
    readers could see two different files) and entry fields it would ignore."""
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
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) - _ENTRY_FIELDS:
            raise CheckpointError(f"{path}: header entry {name!r:.80} is not a tensor description")
    return header, metadata


def _no_duplicate_keys(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _explain(path: Path, header: dict, data_size: int, error: Exception) -> str:
    """safe_open refused the header: name the first tensor at fault in the user's
    terms, else pass on safe_open's own reason."""
    reason = first_line(error).removeprefix("Error while deserializing header: ")
    spans = []
    for name, entry in header.items():
        problem = _entry_problem(entry, data_size, reason)
        if problem:
            return f"{path}: tensor {name!r:.80} {problem}"
        spans.append((*entry["data_offsets"], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            problem = "overlaps another" if begin < end else "leaves a gap before it"
            return f"{path}: tensor {name!r:.80} {problem} in the data section"
        end = stop
    if end != data_size:
        return (f"{path}: the data section has {data_size - end} bytes no tensor accounts for "
                "(truncated or padded file)")
    return f"{path} is not a valid safetensors file ({reason[:200]})"


def _entry_problem(entry: dict, data_size: int, reason: str) -> str | None:
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or f"unknown variant `{dtype}`" in reason:
        return f"has unknown dtype {dtype!r:.40}"
    bits = _bits(dtype)
    if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
            or math.prod(shape) * (bits or 8) >= 2**64):  # safetensors sizes tensors in 64 bits
        return f"has a bad shape {shape!r:.80}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        return "has bad data_offsets"
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return f"lies outside the file (offsets {begin}..{end}, data section {data_size} bytes)"
    if bits is not None:
        numel = math.prod(shape)
        if numel * bits % 8:
            return f"has {numel} {dtype} values, which do not fill whole bytes"
        if end - begin != numel * bits // 8:
            return f"has {end - begin} bytes, its {dtype} shape {shape} needs {numel * bits // 8}"
    return None


def _bits(dtype: str) -> int | None:
    """Bits per value, read from the name safetensors gives the dtype (F32, BF16,
    F8_E4M3, C64, F4...; BOOL takes a byte). Only explains a refusal: safe_open decides."""
    if dtype == "BOOL":
        return 8
    match = re.match(r"[A-Z]+(\d+)", dtype)
    return int(match.group(1)) if match else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- tensors ---------------------------------------------------------------------

def read_tensors(path: str | os.PathLike) -> dict:
    """Every tensor of a validated safetensors file, on the CPU."""
    from safetensors.torch import load_file

    read_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError; torch may lack a dtype
        raise CheckpointError(f"{path}: unreadable safetensors data ({type(e).__name__}: "
                              f"{first_line(e)[:200]})") from None


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


def restore_aliases(tensors: dict, aliases: dict[str, str]) -> dict:
    """Put back the tied keys ``dedupe_shared`` dropped, each sharing its kept tensor."""
    for dropped, kept in aliases.items():
        if kept in tensors:
            tensors[dropped] = tensors[kept]
    return tensors


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """Write tensors atomically: a temp file beside ``path``, fsync, rename."""
    from safetensors.torch import save_file

    tensors, _ = dedupe_shared(tensors)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
