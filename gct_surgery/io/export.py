"""Export a checkpoint in the forms deployment needs, each one verified before it lands.

======================  ==========================================================
form                    what is written
======================  ==========================================================
``full``                every tensor under its original name plus the gates, and the
                        metadata that rebuilds the model (``gct_surgery.load``)
``gates-only``          the gates and whatever else differs from a base (``adapter``)
``unload``              the gates removed: the original architecture's state dict
``fold``                gates with gamma ~ 0 folded into their convs (``fold``)
``onnx``                any of the model forms above through ``torch.onnx.export``,
                        with a dynamic batch axis, checked in onnxruntime
======================  ==========================================================

Every export is written to a temp file beside the output, reloaded, run on a seeded
batch and compared with the model it came from. A failed check raises
``VerificationError`` and the temp file is removed: a bad export never lands.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..core.fold import FoldReport, fold_gates
from ..core.forward import example_input, max_difference, run_model
from ..core.surgery import gates, remove
from ..errors import UserError, VerificationError
from .adapter import apply_adapter, resolve_base, save_adapter
from .atomic import atomic_path, storage_error
from .checkpoint import load_checkpoint, save
from .finite import refuse_nonfinite
from .metadata import CheckpointMeta

_logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx")
ONNX_TOLERANCE = 1e-4  # relative to the output's scale (max |y|, at least 1)
FOLD_TOLERANCE = 1e-4  # the same, for a fold of near-zero (not exactly zero) gammas


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
    fold: FoldReport | None = None
    base: str | None = None
    base_hash: str | None = None
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
        return d


def _check(diff: float, tolerance: float, what: str) -> None:
    if not math.isfinite(diff) or diff > tolerance:
        raise VerificationError(
            f"{what} does not reproduce the source model (max |Δ| {diff:.3g} > {tolerance:.3g} "
            "on a seeded batch); nothing was written")


def _scale(outputs: list[torch.Tensor]) -> float:
    return max([1.0] + [t.abs().max().item() for t in outputs if t.numel()])


def _trained(model: nn.Module) -> bool:
    """True when some gate is not the identity (gamma or beta moved from 0)."""
    return any(bool(g.gamma.detach().any() or g.beta.detach().any()) for g in gates(model).values())


def export(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str = "safetensors",
    gates_only: bool = False,
    base: str | os.PathLike | nn.Module | None = None,
    unload: bool = False,
    fold: bool = False,
    fold_tol: float = 1e-6,
    opset: int | None = None,
    input_size: list[int] | None = None,
    batch: int = 2,
    allow_pickle: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` to ``output`` in one form, verified; see the module doc."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if sum((gates_only, unload, fold)) > 1:
        raise UserError("choose at most one of --gates-only, --unload and --fold")
    if gates_only and format != "safetensors":
        raise UserError("--gates-only writes safetensors; it has no ONNX form")
    if batch < 1:
        raise UserError("the verification batch needs at least 1 sample")
    output = Path(output)
    loaded = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    model, meta = loaded.model, loaded.meta
    refuse_nonfinite(model, checkpoint, "exported")  # the file's fault, not the export's
    x = example_input(input_size or meta.data.get("input_size"), batch=batch)
    reference = run_model(model, x)
    form = "gates-only" if gates_only else "unload" if unload else "fold" if fold else "full"
    result = ExportResult(output, form, format, float("nan"), 0, len(gates(model)),
                          batch_sizes=[batch], source_size_bytes=Path(checkpoint).stat().st_size)

    if gates_only:
        _export_gates_only(model, meta, base, output, x, reference, result, allow_pickle)
        return result

    # The model to write: the source itself, or the source with its gates removed/folded.
    expected, tolerance = reference, 0.0
    event: dict = {"form": form}
    if unload:
        trained = _trained(model)
        remove(model)
        expected = run_model(model, x)
        result.unload_change = max_difference(reference, expected)
        event["output_change"] = result.unload_change
        if trained and result.unload_change > 0:
            result.warnings.append(
                f"the gates were trained: without them the output changes by up to "
                f"{result.unload_change:.4g} (max |Δ| on a seeded batch of {batch})")
    elif fold:
        result.fold = fold_gates(model, fold_tol)
        expected = run_model(model, x)
        tolerance = FOLD_TOLERANCE * _scale(reference)
        fold_diff = max_difference(reference, expected)
        _check(fold_diff, tolerance, f"folding {len(result.fold.folded)} gates")
        event.update(folded=len(result.fold.folded), kept=len(result.fold.kept), max_abs_diff=fold_diff)
        if not result.fold.folded:
            result.warnings.append("no gate has gamma ~ 0; nothing was folded")
    result.gates = len(gates(model))

    if format == "onnx":
        _export_onnx(model, x, output, expected, reference, result, opset)
        return result

    out_meta = meta.with_event("export", **event)
    if not result.gates:
        out_meta = replace(out_meta, gate={})
    with atomic_path(output) as tmp:
        save(model, tmp, out_meta)
        reloaded = load_checkpoint(tmp).model
        got = run_model(reloaded, x)
        # Reload must be bit for bit what was in memory; vs the source, the unload or
        # fold change is the expected difference.
        _check(max_difference(expected, got), 0.0, f"the {form} export")
        result.max_abs_diff = max_difference(reference, got)
        if not unload:
            _check(result.max_abs_diff, tolerance, f"the {form} export")
    result.size_bytes = output.stat().st_size
    return result


def _export_gates_only(model, meta: CheckpointMeta, base, output: Path, x, reference,
                       result: ExportResult, allow_pickle: bool) -> None:
    base_model, base_name = resolve_base(meta, base, allow_pickle=allow_pickle)
    with atomic_path(output) as tmp:
        written = save_adapter(model, meta, base_model, tmp, base_name=base_name)
        rebuilt = apply_adapter(tmp, base_model, allow_pickle=allow_pickle)
        result.max_abs_diff = max_difference(reference, run_model(rebuilt, x))
        _check(result.max_abs_diff, 0.0, "the gates-only export applied to its base")
    result.base, result.base_hash = base_name, written.base_hash
    result.size_bytes = output.stat().st_size


def _export_onnx(model: nn.Module, x: torch.Tensor, output: Path, expected, reference,
                 result: ExportResult, opset: int | None) -> None:
    """torch.onnx.export with a dynamic batch axis, then onnxruntime at two batch sizes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: "
                        "pip install 'gct-surgery[onnx]'") from None
    model.eval()
    other = x.shape[0] + 1
    x2 = torch.randn(other, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    expected2 = run_model(model, x2)
    with atomic_path(output) as tmp:
        _onnx_write(model, x, tmp, opset)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        worst = 0.0
        for inp, want in ((x, expected), (x2, expected2)):
            try:
                got = [torch.from_numpy(o) for o in session.run(None, {name: inp.numpy()})]
            except Exception as e:  # onnxruntime raises its own exception types
                raise VerificationError(f"onnxruntime could not run the export at batch size "
                                        f"{inp.shape[0]}: {str(e).splitlines()[0][:200]}") from None
            diff = max_difference(want, got)
            _check(diff, ONNX_TOLERANCE * _scale(want), f"the ONNX export at batch size {inp.shape[0]}")
            worst = max(worst, diff)
        result.max_abs_diff = max(worst, max_difference(reference, expected))
    result.batch_sizes = [x.shape[0], other]
    result.size_bytes = output.stat().st_size


def _onnx_write(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    """The dynamo exporter (torch's default); the TorchScript one if it fails."""
    import warnings

    kwargs = {"opset_version": opset} if opset else {}
    try:
        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              dynamic_shapes=({0: batch},), external_data=False,
                              verbose=False, **kwargs)
        return
    except Exception as e:  # the exporter raises many types; fall back once, then report
        if storage_error(path, e) is not None:  # a full disk is no reason to try another exporter
            raise
        _logger.warning("dynamo ONNX export failed (%s: %s); trying the TorchScript exporter",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}}, **kwargs)
    except Exception as e:
        if storage_error(path, e) is not None:
            raise  # atomic_path names the output and the reason
        raise UserError(f"torch.onnx.export failed for this model: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
