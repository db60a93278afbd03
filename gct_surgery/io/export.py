"""Export a checkpoint in the forms deployment needs, each one verified before it lands.

======================  ==========================================================
form                    what is written
======================  ==========================================================
``full``                every tensor under its original name plus the gates, and the
                        metadata that rebuilds the model (``gct_surgery.load``)
``gates-only``          the gates and whatever else differs from a base (``adapter``)
``unload``              the gates removed: the original architecture's state dict
``fold``                gates with gamma ~ 0 folded into their convs (``fold``)
======================  ==========================================================

Any of full, unload and fold can be written as safetensors, as ONNX or a
``torch.export`` program (``export_graph``), or, without gates, as a timm folder
(``export_timm``). The format follows the output's name (``export_format``).

Every export is written to a temp file beside the output, reloaded, run on a seeded
batch and compared with the model it came from. A failed check raises
``VerificationError`` and the temp file is removed: a bad export never lands.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..core.fold import fold_gates
from ..core.forward import example_input, max_difference, run_model
from ..core.surgery import gates, remove
from ..errors import UserError, VerificationError
from .adapter import apply_adapter, resolve_base, save_adapter
from .atomic import atomic_path
from .checkpoint import load_checkpoint, save
from .export_format import FORMAT_NAMES, FORMATS, ExportResult, check, output_scale, resolve_format
from .export_graph import export_onnx, export_pt2
from .export_timm import export_timm_folder, refuse_gates, refuse_unless_timm
from .finite import refuse_nonfinite
from .metadata import CheckpointMeta

__all__ = ["FORMATS", "ExportResult", "VerificationError", "export", "resolve_format"]

FOLD_TOLERANCE = 1e-4  # relative to the output's scale, for a fold of near-zero (not exactly zero) gammas


def _trained(model: nn.Module) -> bool:
    """True when some gate is not the identity (gamma or beta moved from 0)."""
    return any(bool(g.gamma.detach().any() or g.beta.detach().any()) for g in gates(model).values())


def export(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str | None = None,
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
    """Export ``checkpoint`` to ``output`` in one form, verified; see the module doc.
    ``format`` (safetensors, onnx, pt2, timm) defaults to what ``output``'s name says;
    a ``format`` the name contradicts is refused (``resolve_format``)."""
    format = resolve_format(output, format)
    if sum((gates_only, unload, fold)) > 1:
        raise UserError("choose at most one of --gates-only, --unload and --fold")
    if gates_only and format != "safetensors":
        raise UserError(f"--gates-only writes safetensors; it has no {FORMAT_NAMES[format]} form: "
                        f"export -o NAME.safetensors --gates-only")
    if batch < 1:
        raise UserError("the verification batch needs at least 1 sample")
    output = Path(output)
    loaded = load_checkpoint(checkpoint)
    model, meta = loaded.model, loaded.meta
    if format == "timm":  # before any work: timm must be able to build the architecture
        refuse_unless_timm(meta, checkpoint, output)
        if not (unload or fold):
            refuse_gates(len(gates(model)), form="full", output=output)
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
        tolerance = FOLD_TOLERANCE * output_scale(reference)
        fold_diff = max_difference(reference, expected)
        check(fold_diff, tolerance, f"folding {len(result.fold.folded)} gates")
        event.update(folded=len(result.fold.folded), kept=len(result.fold.kept), max_abs_diff=fold_diff)
        if not result.fold.folded:
            result.warnings.append("no gate has gamma ~ 0; nothing was folded")
    result.gates = len(gates(model))

    if format == "onnx":
        export_onnx(model, x, output, expected, reference, result, opset)
        return result
    if format == "pt2":
        export_pt2(model, x, output, expected, reference, result)
        return result
    if format == "timm":
        refuse_gates(result.gates, form, output)
        export_timm_folder(model, meta, x, output, expected, reference, result)
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
        check(max_difference(expected, got), 0.0, f"the {form} export")
        result.max_abs_diff = max_difference(reference, got)
        if not unload:
            check(result.max_abs_diff, tolerance, f"the {form} export")
    result.size_bytes = output.stat().st_size
    return result


def _export_gates_only(model, meta: CheckpointMeta, base, output: Path, x, reference,
                       result: ExportResult, allow_pickle: bool) -> None:
    base_model, base_name = resolve_base(meta, base, allow_pickle=allow_pickle)
    with atomic_path(output) as tmp:
        written = save_adapter(model, meta, base_model, tmp, base_name=base_name)
        rebuilt = apply_adapter(tmp, base_model, allow_pickle=allow_pickle)
        result.max_abs_diff = max_difference(reference, run_model(rebuilt, x))
        check(result.max_abs_diff, 0.0, "the gates-only export applied to its base")
    result.base, result.base_hash = base_name, written.base_hash
    result.size_bytes = output.stat().st_size
