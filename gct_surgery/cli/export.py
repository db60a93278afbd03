"""``gct-surgery export``: write a checkpoint in a deployable form, verified."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._output import info, print_json, print_kv, warn
from .inject import parse_input_size


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint (.safetensors).", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the export.", show_default=False),
    format: str = typer.Option("safetensors", "--format", help="safetensors or onnx."),
    gates_only: bool = typer.Option(False, "--gates-only", help="Only the gates and what differs from the base (an adapter file)."),
    base: Optional[str] = typer.Option(None, "--base", help="The base for --gates-only: a SOURCE or weights file. Default: the weights the model was opened from."),
    unload: bool = typer.Option(False, "--unload", help="Remove the gates: the original architecture."),
    fold: bool = typer.Option(False, "--fold", help="Fold gates with gamma ~ 0 into the following conv."),
    fold_tol: float = typer.Option(1e-6, "--fold-tol", help="A gate folds when max |gamma| <= this."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    input_size: Optional[str] = typer.Option(None, help="Input size for the verification batch, e.g. 3,224,224."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled base module. Only for files you trust."),
) -> None:
    """Export a checkpoint (full, gates-only, unloaded, folded, or ONNX). The export is
    reloaded and compared with the source before it is kept; a failed check writes nothing."""
    size = parse_input_size(input_size)
    from ..io.export import export as run_export

    result = run_export(checkpoint, output, format=format, gates_only=gates_only, base=base,
                        unload=unload, fold=fold, fold_tol=fold_tol, opset=opset,
                        input_size=size, allow_pickle=allow_pickle)
    if json_out:
        print_json(result.to_dict())
        return
    for message in result.warnings:
        warn(message)
    pairs = [("form", result.form), ("format", result.format), ("written", str(result.output)),
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
