"""Graph exports: ONNX and ``torch.export`` programs (``.pt2``), both with a dynamic
batch axis, both loadable without gct-surgery.

Each is written to a temp file, reloaded by its own runtime (onnxruntime,
``torch.export.load``) and run at two batch sizes (the verification batch and one more)
against the model in PyTorch, within ``GRAPH_TOLERANCE`` x the output's scale. The
gates trace as plain torch ops (``core.gate.is_tracing``), so no gct-surgery op is
recorded in the graph.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core.forward import flat_outputs, max_difference, run_model
from ..errors import UserError, VerificationError
from .atomic import atomic_path, storage_error
from .export_format import GRAPH_TOLERANCE, ExportResult, check, output_scale

_logger = logging.getLogger(__name__)


def export_onnx(model: nn.Module, x: torch.Tensor, output: Path, expected, reference,
                result: ExportResult, opset: int | None) -> None:
    """torch.onnx.export with a dynamic batch axis, then onnxruntime at two batch sizes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: "
                        "pip install 'gct-surgery[onnx]'") from None
    model.eval()
    with atomic_path(output) as tmp:
        _onnx_write(model, x, tmp, opset)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(inp: torch.Tensor) -> list[torch.Tensor]:
            try:
                return [torch.from_numpy(o) for o in session.run(None, {name: inp.numpy()})]
            except Exception as e:  # onnxruntime raises its own exception types
                raise VerificationError(f"onnxruntime could not run the export at batch size "
                                        f"{inp.shape[0]}: {str(e).splitlines()[0][:200]}") from None

        _verify_two_batches(model, x, expected, reference, run, "the ONNX export", result)
    result.size_bytes = output.stat().st_size


def export_pt2(model: nn.Module, x: torch.Tensor, output: Path, expected, reference,
               result: ExportResult) -> None:
    """``torch.export.export`` with a dynamic batch, saved with ``torch.export.save``;
    reloaded with ``torch.export.load`` as a plain-torch user would."""
    model.eval()
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(output) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        except Exception as e:  # the exporter raises many types (data-dependent control flow...)
            raise UserError(f"torch.export could not trace this model: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}; export "
                            f"-o {output.with_suffix('.safetensors')} instead") from None
        with open(tmp, "wb") as f:  # a file object: torch warns about a path not ending in .pt2
            torch.export.save(program, f)
        with open(tmp, "rb") as f:
            reloaded = torch.export.load(f).module()

        @torch.no_grad()
        def run(inp: torch.Tensor) -> list[torch.Tensor]:
            return flat_outputs(reloaded(inp))

        _verify_two_batches(model, x, expected, reference, run, "the torch.export program", result)
    result.size_bytes = output.stat().st_size


def _verify_two_batches(model: nn.Module, x: torch.Tensor, expected, reference,
                        run: Callable[[torch.Tensor], list], what: str, result: ExportResult) -> None:
    """The reloaded graph at the verification batch and at one more sample: the batch
    axis is really dynamic, and the numbers match eager PyTorch."""
    other = x.shape[0] + 1
    x2 = torch.randn(other, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for inp, want in ((x, expected), (x2, run_model(model, x2))):
        diff = max_difference(want, run(inp))
        check(diff, GRAPH_TOLERANCE * output_scale(want), f"{what} at batch size {inp.shape[0]}")
        worst = max(worst, diff)
    result.max_abs_diff = max(worst, max_difference(reference, expected))
    result.batch_sizes = [x.shape[0], other]


def _onnx_write(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    """The dynamo exporter (torch's default); the TorchScript one if it fails."""
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
