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

Any of full, unload and fold can be written in any of ``FORMATS``: safetensors, ONNX, a
``torch.export`` program or, without gates, a timm folder
(``model.safetensors`` + timm's ``config.json``, which ``timm.create_model("local-dir:
FOLDER", pretrained=True)`` loads with its head, class names and preprocessing). The
format follows the output's name (``resolve_format``), so ``-o m.onnx`` never writes
safetensors under an ``.onnx`` name; a name that says none, or a ``--format`` it
contradicts, is refused in one line that names the fix.

Every export is written to a temp file (or folder) beside the output, reloaded the way
its consumer would, run on a seeded batch and compared with the model it came from
(``_verify``): bit for bit, or for a graph within ``GRAPH_TOLERANCE`` at two batch
sizes. A failed check raises ``VerificationError`` and nothing lands.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..core.fold import fold_gates
from ..core.model import (example_input, flat_outputs, max_difference, model_num_classes,
                          output_names, run_model, run_with_hooks)
from ..core.surgery import gates, remove
from ..errors import UserError, VerificationError, first_line
from .adapter import apply_adapter, resolve_base, save_adapter
from .atomic import atomic_folder, atomic_path, storage_error
from .checkpoint import load_checkpoint, write_checkpoint
from .state_dicts import refuse_nonfinite, unshared
from .metadata import CheckpointMeta

if TYPE_CHECKING:
    from ..core.fold import FoldReport

__all__ = ["FORMATS", "ExportResult", "VerificationError", "export", "resolve_format"]


@dataclass(frozen=True)
class Format:
    suffix: str       # what an output's name ends with; "/" for a folder
    title: str        # the format in messages
    graph: bool = False  # verified within GRAPH_TOLERANCE at two batch sizes, not bit for bit


FORMATS = {"safetensors": Format(".safetensors", "safetensors"),
           "onnx": Format(".onnx", "ONNX", graph=True),
           "pt2": Format(".pt2", "torch.export (.pt2)", graph=True),
           "timm": Format("/", "timm folder")}
_logger = logging.getLogger(__name__)
Runner = Callable[[torch.Tensor], list]  # an export reloaded by its consumer, run on a batch
GRAPH_TOLERANCE = 1e-4  # vs eager, relative to the output's scale (max |y|, at least 1)
FOLD_TOLERANCE = 1e-4  # x the output's scale: a fold of near-zero (not exactly zero) gammas
_TIMM_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


@dataclass
class ExportResult:
    """What was written and how well it reproduces the source."""

    output: Path
    form: str
    format: str
    max_abs_diff: float  # reloaded export vs the source checkpoint's model
    size_bytes: int
    gates: int  # gates left in the exported model
    input_shapes: list[list[int]] = field(default_factory=list)  # the verified inputs
    output_names: list[str] = field(default_factory=list)  # a graph's outputs, in order
    source_size_bytes: int | None = None
    unload_change: float | None = None  # output change caused by removing the gates
    fold: "FoldReport | None" = None
    base: str | None = None
    base_hash: str | None = None
    files: list[str] = field(default_factory=list)  # a folder's files
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        optional = {"unload_change": self.unload_change, "fold": self.fold and self.fold.to_dict(),
                    "base": self.base, "base_hash": self.base_hash, "files": self.files or None}
        return {"output": str(self.output), "form": self.form, "format": self.format,
                "max_abs_diff": self.max_abs_diff, "size_bytes": self.size_bytes,
                "source_size_bytes": self.source_size_bytes, "gates": self.gates,
                "verified_input_shapes": self.input_shapes, "warnings": self.warnings,
                **{k: v for k, v in optional.items() if v is not None},
                **({"output_names": self.output_names} if self.output_names else {})}


def resolve_format(output: str | os.PathLike, format: str | None = None) -> str:
    """The export format ``output``'s name asks for, checked against ``--format``."""
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    text = os.fspath(output)
    path = Path(text)
    suffix = "/" if text.endswith(("/", os.sep)) else path.suffix.lower()
    by_name = next((name for name, f in FORMATS.items() if f.suffix == suffix), None)
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
    found = ("a folder" if by_name == "timm" else f"a {by_name} name" if by_name
             else "no known suffix")
    raise UserError(f"--format {format} does not match -o {text} ({found}): write "
                    f"-o {_named(path, format)}" + (f", or drop --format {format}" if by_name
                                                    else ""))


def _named(path: Path, format: str) -> str:
    """``path`` renamed for ``format`` (``m.safetensors`` -> ``m.onnx``, ``m/``)."""
    known = path.suffix.lower() in (*(f.suffix for f in FORMATS.values()), ".pt", ".pth", ".bin")
    if format == "timm":
        return f"{path.with_suffix('') if known else path}/"
    suffix = FORMATS[format].suffix
    return str(path.with_suffix(suffix) if known else path.with_name(path.name + suffix))


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
    allow_pickle: bool = False,
    static: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` to ``output`` in one form, verified; see the module doc.
    ``format`` (safetensors, onnx, pt2, timm) defaults to what ``output``'s name says."""
    format = resolve_format(output, format)
    if sum((gates_only, unload, fold)) > 1:
        raise UserError("choose at most one of --gates-only, --unload and --fold")
    if gates_only and format != "safetensors":
        raise UserError(f"--gates-only writes safetensors; it has no {FORMATS[format].title} "
                        "form: export -o NAME.safetensors --gates-only")
    output = Path(output)
    loaded = load_checkpoint(checkpoint)
    model, meta = loaded.model, loaded.meta  # in eval mode
    refuse_nonfinite(model, checkpoint, "exported")  # the file's fault, not the export's
    x = example_input(input_size or meta.data.get("input_size"), batch=2)
    outputs = run_with_hooks(model, x, [])  # the structure names a graph's outputs
    reference = flat_outputs(outputs)
    form = "gates-only" if gates_only else "unload" if unload else "fold" if fold else "full"
    result = ExportResult(output, form, format, float("nan"), 0, 0,  # _apply_form counts gates
                          source_size_bytes=Path(checkpoint).stat().st_size)
    expected, event = _apply_form(model, form, x, reference, result, fold_tol)
    if format == "timm":
        _refuse_unless_timm(meta, checkpoint, output, result)
    if gates_only:  # the base is the file's (consented) or the user's: resolved before writing
        base_model, result.base = resolve_base(meta, base, allow_pickle=allow_pickle)

    def write(tmp: Path, spatial: bool) -> Runner:
        if gates_only:
            written = save_adapter(model, meta, base_model, tmp, base_name=result.base)
            result.base_hash = written.base_hash
            rebuilt = apply_adapter(tmp, base_model, allow_pickle=allow_pickle)
        elif format == "safetensors":
            out_meta = meta.with_event("export", form=form, **event)
            write_checkpoint(model, tmp, out_meta if result.gates else replace(out_meta, gate={}))
            rebuilt = load_checkpoint(tmp).model
        elif format == "timm":
            rebuilt = _write_timm_folder(model, meta, tmp, output)
        elif format == "onnx":
            result.output_names = output_names(outputs)
            return _write_onnx(model, x, tmp, opset, spatial, result.output_names)
        else:
            return _write_pt2(model, x, tmp, output, spatial)
        return lambda inp: run_model(rebuilt, inp)

    spatial = FORMATS[format].graph and not static
    with (atomic_folder if format == "timm" else atomic_path)(output) as tmp:
        try:
            _verify(write(tmp, spatial), model, x, expected, reference, result, spatial)
        except OtherSizeError as e:
            if not spatial:
                raise
            result.warnings.append(f"this model does not take other input sizes ({e}): "
                                   f"exported for {'x'.join(map(str, x.shape[2:]))} only, "
                                   "as --static")
            _verify(write(tmp, False), model, x, expected, reference, result, False)
        result.files = sorted(p.name for p in tmp.iterdir()) if format == "timm" else []
    result.size_bytes = (sum((output / f).stat().st_size for f in result.files) if result.files
                         else output.stat().st_size)
    return result


def _apply_form(model: nn.Module, form: str, x, reference, result: ExportResult,
                fold_tol: float) -> tuple[list, dict]:
    """Remove or fold the gates as ``form`` asks: the outputs the export must then give,
    and what the checkpoint's history records about it."""
    if form == "unload":
        remove(model)  # untrained gates are the identity: no change, no warning
        expected = run_model(model, x)
        result.unload_change = max_difference(reference, expected)
        event = {"output_change": result.unload_change}
        if result.unload_change > 0:
            result.warnings.append(
                f"the gates were trained: without them the output changes by up to "
                f"{result.unload_change:.4g} (max |Δ| on a seeded batch of {x.shape[0]})")
    elif form == "fold":
        result.fold = fold_gates(model, fold_tol)
        expected = run_model(model, x)
        diff = max_difference(reference, expected)
        _check(diff, FOLD_TOLERANCE * _scale(reference), f"folding {len(result.fold.folded)} gates")
        event = {"folded": len(result.fold.folded), "kept": len(result.fold.kept),
                 "max_abs_diff": diff}
        if not result.fold.folded:
            result.warnings.append("no gate has gamma ~ 0; nothing was folded")
    else:
        expected, event = reference, {}
    result.gates = len(gates(model))
    return expected, event


def _verify(run: Runner, model: nn.Module, x, expected, reference, result: ExportResult,
            spatial: bool) -> None:
    """The one check every export passes: the reloaded export against the model it was
    written from, bit for bit; a graph within ``GRAPH_TOLERANCE`` x the output's scale at
    the verification batch and at ``second_input`` (its free axes really are free)."""
    graph = FORMATS[result.format].graph
    cases = [(x, expected)]
    if graph:
        x2 = second_input(x, spatial)
        try:
            cases.append((x2, run_model(model, x2)))
        except Exception as e:  # the model itself takes one size only
            raise OtherSizeError(f"the model fails at input {tuple(x2.shape)}: "
                                 f"{first_line(e)[:200]}") from None
    worst = 0.0
    for i, (inp, want) in enumerate(cases):
        what = f"the {result.form} export as {FORMATS[result.format].title}"
        try:
            diff = max_difference(want, run(inp))
            _check(diff, GRAPH_TOLERANCE * _scale(want) if graph else 0.0,
                   f"{what} at input {tuple(inp.shape)}" if graph else what)
        except VerificationError as e:  # at the second input: it may not take that size
            raise (OtherSizeError(str(e)) if i else e) from None
        worst = max(worst, diff)
    result.max_abs_diff = max(worst, max_difference(reference, expected))
    result.input_shapes = [list(inp.shape) for inp, _ in cases]


class OtherSizeError(VerificationError):
    """The export (or the model) fails at the second input's size, not at the first."""


def _check(diff: float, tolerance: float, what: str) -> None:
    if not math.isfinite(diff) or diff > tolerance:
        raise VerificationError(
            f"{what} does not reproduce the source model (max |Δ| {diff:.3g} > {tolerance:.3g} "
            "on a seeded batch); nothing was written")


def _scale(outputs: list) -> float:
    """max |y| over the outputs, at least 1: what a relative tolerance multiplies."""
    return max([1.0] + [t.abs().max().item() for t in outputs if t.numel()])


# --- the timm folder --------------------------------------------------------------------

def _refuse_unless_timm(meta: CheckpointMeta, checkpoint, output: Path,
                        result: ExportResult) -> None:
    """timm builds a folder of a timm architecture without gates: a one-line refusal else."""
    spec = str(meta.source.get("spec", ""))
    if not spec.startswith("timm:"):
        raise UserError(f"a timm folder needs a timm architecture, and {checkpoint} was built from "
                        f"{spec or 'an unrecorded source'}; export -o {output}.pt2 (plain torch) "
                        f"or -o {output}.safetensors --unload (a state dict) instead")
    if result.gates:
        fix = ("--unload instead of --fold (the output changes)" if result.form == "fold" else
               "--unload (removes them) or --fold (folds those with gamma ~ 0)")
        raise UserError(f"timm cannot build gates and this model has {result.gates}; add {fix}, "
                        f"or export -o {output}.pt2 to keep them")


def _write_timm_folder(model: nn.Module, meta: CheckpointMeta, folder: Path, output: Path):
    """timm's own files (``save_config_for_hf`` with the recorded preprocessing), and the
    model timm's ``local-dir:`` loader rebuilds from them."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    names = meta.data.get("class_names")
    same = names and len(names) == model_num_classes(model)
    model_config = {"label_names": list(names)} if same else {}
    data_config = {k: meta.data[k] for k in _TIMM_DATA_KEYS if meta.data.get(k) is not None}
    # timm's loader wants every key, safetensors no shared storage: a copy per name
    save_file(unshared(model.state_dict()), str(folder / "model.safetensors"))
    try:
        save_config_for_hf(model, str(folder / "config.json"), model_config=model_config,
                           data_config=data_config)
        reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # an older timm, an odd model
        raise UserError(f"timm could not write or rebuild this model as a folder "
                        f"({type(e).__name__}: {first_line(e)[:160]}); upgrade timm (pip install "
                        f"-U timm), or export -o {output}.pt2 instead") from None
    return reloaded  # a wrong head (an older timm) fails ``_verify``


# --- graph exports: ONNX and torch.export (.pt2), loadable without gct-surgery ----------
# Traced with the axes ``dynamic_shapes`` leaves free; the gates trace as plain torch ops
# (``core.gate.is_tracing``), so no gct-surgery op is recorded in the graph.

def dynamic_shapes(x: torch.Tensor, spatial: bool) -> tuple[dict]:
    """The input axes a graph export leaves free: the batch, and with ``spatial`` the
    height and width (``Dim.AUTO``: a model that fixes them specializes instead of
    failing, and the check at ``second_input`` finds it)."""
    free = range(2, x.ndim) if spatial else ()
    return ({0: torch.export.Dim("batch", min=1), **{a: torch.export.Dim.AUTO for a in free}},)


def second_input(x: torch.Tensor, spatial: bool) -> torch.Tensor:
    """A second verification input, different in every free axis: one more sample and,
    with ``spatial``, 32 more rows and 16 more of each other axis (not square when the
    first input is)."""
    shape = [x.shape[0] + 1, x.shape[1]]
    shape += [n + (32 if a == 2 else 16) * spatial for a, n in enumerate(x.shape) if a >= 2]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _write_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None,
                spatial: bool, outputs: list[str]) -> Runner:
    """``torch.onnx.export`` (dynamo, else the TorchScript exporter), run by onnxruntime;
    the graph's input is ``input``, its outputs ``outputs`` (``core.model.output_names``)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: "
                        "pip install 'gct-surgery[onnx]'") from None
    axes = {"input": {axis: f"dim{axis}" for axis in dynamic_shapes(x, spatial)[0]}}
    by_exporter = {True: {"dynamic_shapes": dynamic_shapes(x, spatial), "external_data": False,
                          "verbose": False},
                   False: {"dynamic_axes": axes}}
    for dynamo, kwargs in by_exporter.items():
        try:
            with warnings.catch_warnings(action="ignore"):
                torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["input"],
                                  output_names=outputs, **kwargs,
                                  **({"opset_version": opset} if opset else {}))
            break
        except Exception as e:  # the exporter raises many types; fall back once, then report
            if storage_error(path, e) is not None:  # a full disk: atomic_path names it
                raise
            if not dynamo:
                raise UserError(f"torch.onnx.export failed for this model: {type(e).__name__}: "
                                f"{first_line(e)[:200]}") from None
            _logger.warning("dynamo ONNX export failed (%s: %s); trying the TorchScript "
                            "exporter", type(e).__name__, first_line(e)[:200])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(inp: torch.Tensor) -> list[torch.Tensor]:
        try:
            return [torch.from_numpy(o) for o in session.run(None, {name: inp.numpy()})]
        except Exception as e:  # onnxruntime raises its own exception types
            raise VerificationError(f"onnxruntime could not run the export at input "
                                    f"{tuple(inp.shape)}: {first_line(e)[:200]}") from None
    return run


def _write_pt2(model: nn.Module, x: torch.Tensor, path: Path, output: Path,
               spatial: bool) -> Runner:
    """``torch.export.export``, saved with ``torch.export.save`` and reloaded with
    ``torch.export.load`` as a plain-torch user would."""
    try:
        with warnings.catch_warnings(action="ignore"):
            shapes = dynamic_shapes(x, spatial)
            program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    except Exception as e:  # the exporter raises many types (data-dependent control flow...)
        raise UserError(f"torch.export could not trace this model: {type(e).__name__}: "
                        f"{first_line(e)[:200]}; export -o {output.with_suffix('.safetensors')} "
                        "instead") from None
    with open(path, "wb") as f:  # a file object: torch warns about a path not ending in .pt2
        torch.export.save(program, f)
    with open(path, "rb") as f:
        reloaded = torch.export.load(f).module()

    @torch.no_grad()
    def run(inp: torch.Tensor) -> list[torch.Tensor]:
        try:
            return flat_outputs(reloaded(inp))
        except Exception as e:  # a guard of the program: this input size is not allowed
            raise VerificationError(f"the program refuses input {tuple(inp.shape)}: "
                                    f"{first_line(e)[:200]}") from None
    return run
