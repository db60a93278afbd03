"""What an export is: the format its output name asks for, the record of what was
written, and the check every export passes before it lands.

The format follows the output's name, so ``-o m.onnx`` never writes safetensors under
an ``.onnx`` name: ``.safetensors``, ``.onnx`` and ``.pt2`` name their formats, and a
name ending in ``/`` (or ``--format timm``) is a timm folder. ``--format`` that
disagrees with the name, or a name that says nothing (``m.pt``), is refused in one
line that names the fix. No torch here: the CLI imports this for ``--help``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, VerificationError

if TYPE_CHECKING:
    from ..core.fold import FoldReport

FORMATS = ("safetensors", "onnx", "pt2", "timm")
SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx", ".pt2": "pt2"}
FORMAT_NAMES = {"safetensors": "safetensors", "onnx": "ONNX", "pt2": "torch.export (.pt2)",
                "timm": "timm folder"}
GRAPH_TOLERANCE = 1e-4  # ONNX and .pt2 vs eager, relative to the output's scale (max |y|, at least 1)


def resolve_format(output: str | os.PathLike, format: str | None = None) -> str:
    """The export format ``output`` asks for, checked against ``--format``."""
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    text = os.fspath(output)
    path = Path(text)
    folder_name = text.endswith(("/", os.sep))
    by_name = "timm" if folder_name else SUFFIXES.get(path.suffix.lower())
    flag = f"--format {format}"
    if format is None:
        if by_name:
            return by_name
        if path.is_dir():  # the atomic writer's message, with the folder form offered
            raise UserError(f"could not write {path}: it is a folder; give a file path (e.g. "
                            f"{path / 'model.safetensors'}), or add --format timm to write a "
                            "timm folder there")
        raise UserError(f"cannot tell the export format from the name {path.name!r}: name it "
                        f"{_named(path, 'safetensors')}, {_named(path, 'onnx')} or "
                        f"{_named(path, 'pt2')}, or {path.with_suffix('')}/ for a timm folder")
    if by_name == format or (format == "timm" and by_name is None):
        return format
    found = "a folder" if by_name == "timm" else (f"a {by_name} name" if by_name else "no known suffix")
    raise UserError(f"{flag} does not match -o {text} ({found}): write -o {_named(path, format)}"
                    + (f", or drop {flag}" if by_name else ""))


def _named(path: Path, format: str) -> str:
    """``path`` renamed for ``format`` (``m.safetensors`` -> ``m.onnx``, ``m/``)."""
    if format == "timm":
        return f"{path.with_suffix('') if path.suffix.lower() in SUFFIXES else path}/"
    suffix = next(s for s, f in SUFFIXES.items() if f == format)
    known = path.suffix.lower() in SUFFIXES or path.suffix.lower() in (".pt", ".pth", ".bin")
    return str(path.with_suffix(suffix) if known else path.with_name(path.name + suffix))


@dataclass
class ExportResult:
    """What was written and how well it reproduces the source."""

    output: Path
    form: str
    format: str
    max_abs_diff: float  # reloaded export vs the source checkpoint's model
    size_bytes: int
    gates: int  # gates left in the exported model
    batch_sizes: list[int] = field(default_factory=list)
    source_size_bytes: int | None = None
    unload_change: float | None = None  # output change caused by removing the gates
    fold: "FoldReport | None" = None
    base: str | None = None
    base_hash: str | None = None
    files: list[str] = field(default_factory=list)  # a folder's files
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"output": str(self.output), "form": self.form, "format": self.format,
             "max_abs_diff": self.max_abs_diff, "size_bytes": self.size_bytes,
             "source_size_bytes": self.source_size_bytes, "gates": self.gates,
             "verified_batch_sizes": self.batch_sizes, "warnings": self.warnings}
        if self.unload_change is not None:
            d["unload_change"] = self.unload_change
        if self.fold is not None:
            d["fold"] = self.fold.to_dict()
        if self.base is not None:
            d.update(base=self.base, base_hash=self.base_hash)
        if self.files:
            d["files"] = self.files
        return d


def check(diff: float, tolerance: float, what: str) -> None:
    """Refuse an export whose reload differs from the model by more than ``tolerance``."""
    if not math.isfinite(diff) or diff > tolerance:
        raise VerificationError(
            f"{what} does not reproduce the source model (max |Δ| {diff:.3g} > {tolerance:.3g} "
            "on a seeded batch); nothing was written")


def output_scale(outputs: list) -> float:
    """max |y| over the outputs, at least 1: what a relative tolerance multiplies."""
    return max([1.0] + [t.abs().max().item() for t in outputs if t.numel()])
