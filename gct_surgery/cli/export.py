"""``gct-surgery export``: write a checkpoint in a deployable form, verified."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._choices import trust_source_option
from ._output import info, print_json, print_kv, warn
from .inject import parse_input_size


class ExportFormat(str, Enum):
    """What ``-o`` is written as; by default its name decides (``io/export_format.py``)."""

    safetensors = "safetensors"
    onnx = "onnx"
    pt2 = "pt2"
    timm = "timm"


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint (.safetensors).", show_default=False),
    output: str = typer.Option(..., "--output", "-o", show_default=False, metavar="<path>",
                               help="Where to write the export; its name picks the format: "
                                    "NAME.safetensors, NAME.onnx, NAME.pt2 (torch.export), or "
                                    "NAME/ for a timm folder (model.safetensors + config.json)."),
    format: Optional[ExportFormat] = typer.Option(
        None, "--format", show_default=False,
        help="The format, when -o's name does not say it (timm: a folder timm.create_model"
             "('local-dir:NAME', pretrained=True) loads; needs --unload or --fold). "
             "Must agree with -o's suffix."),
    gates_only: bool = typer.Option(False, "--gates-only", help="Only the gates and what differs from the base (an adapter file)."),
    base: Optional[str] = typer.Option(None, "--base", help="The base for --gates-only: a SOURCE or weights file. Default: the weights the model was opened from."),
    unload: bool = typer.Option(False, "--unload", help="Remove the gates: the original architecture."),
    fold: bool = typer.Option(False, "--fold", help="Fold gates with gamma ~ 0 into the following conv."),
    fold_tol: float = typer.Option(1e-6, "--fold-tol", help="A gate folds when max |gamma| <= this."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    input_size: Optional[str] = typer.Option(None, help="Input size for the verification batch, e.g. 3,224,224."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Let --base be a pickled module (runs its code)."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Export a checkpoint (full, gates-only, unloaded or folded; as safetensors, ONNX, a
    torch.export program or a timm folder). The export is reloaded and compared with the
    source before it is kept; a failed check writes nothing."""
    size = parse_input_size(input_size)
    from ..io.export import export as run_export
    from ..io.trust import trusting

    with trusting(trust_source):
        result = run_export(checkpoint, output, format=format.value if format else None,
                            gates_only=gates_only, base=base, unload=unload, fold=fold,
                            fold_tol=fold_tol, opset=opset, input_size=size,
                            allow_pickle=allow_pickle)
    if json_out:
        print_json(result.to_dict())
        return
    for message in result.warnings:
        warn(message)
    written = f"{result.output}/ ({', '.join(result.files)})" if result.files else str(result.output)
    pairs = [("form", result.form), ("format", result.format), ("written", written),
             ("size", f"{result.size_bytes:,} bytes")]
    if result.source_size_bytes:
        pairs.append(("size vs checkpoint", f"{100 * result.size_bytes / result.source_size_bytes:.3f}%"))
    pairs.append(("gates in export", result.gates))
    if result.fold is not None:
        pairs += [("gates folded", len(result.fold.folded)), ("gates kept", len(result.fold.kept))]
    if result.unload_change is not None:
        pairs.append(("output change without gates", result.unload_change))
    if result.base is not None:
        pairs += [("base", result.base), ("base hash", result.base_hash)]
    pairs += [("verified at batch sizes", ", ".join(map(str, result.batch_sizes))),
              ("max |Δ| vs source", result.max_abs_diff)]
    print_kv("export", pairs)
    if result.fold is not None and result.fold.kept:
        reasons = sorted(set(result.fold.kept.values()))
        info(f"{len(result.fold.kept)} gates kept; e.g. {result.fold.kept[next(iter(result.fold.kept))]}"
             if len(reasons) > 1 else f"{len(result.fold.kept)} gates kept: {reasons[0]}")
