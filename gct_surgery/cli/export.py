"""``gct-surgery export``: write a checkpoint in a deployable form, verified."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._output import info, print_json, print_kv, trust_source_option, warn
from .inject import parse_numbers


def export(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint (.safetensors).", show_default=False),
    output: str = typer.Option(..., "--output", "-o", show_default=False, metavar="<path>",
                               help="Where to write the export; its name picks the format: "
                                    "NAME.safetensors, NAME.onnx, NAME.pt2 (torch.export), or "
                                    "NAME/ for a timm folder (model.safetensors + config.json)."),
    format: Optional[str] = typer.Option(
        None, "--format", show_default=False, metavar="[safetensors|onnx|pt2|timm]",
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
    static: bool = typer.Option(False, "--static", help=(
        "ONNX and .pt2: fix the height and width at the checkpoint's (the batch stays free).")),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Let --base be a pickled module (runs its code)."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Export a checkpoint (full, gates-only, unloaded or folded; as safetensors, ONNX, a
    torch.export program or a timm folder). The export is reloaded and compared with the
    source before it is kept; a failed check writes nothing."""
    size = parse_numbers(input_size, "--input-size", int)
    from ..io.export import export as run_export

    result = run_export(checkpoint, output, format=format,
                        gates_only=gates_only, base=base, unload=unload, fold=fold,
                        fold_tol=fold_tol, opset=opset, input_size=size,
                        allow_pickle=allow_pickle, static=static)
    if json_out:
        print_json(result.to_dict())
        return
    for message in result.warnings:
        warn(message)
    written = f"{result.output}/ ({', '.join(result.files)})" if result.files else str(result.output)
    share = 100 * result.size_bytes / result.source_size_bytes
    pairs = [("form", result.form), ("format", result.format), ("written", written),
             ("size", f"{result.size_bytes:,} bytes"), ("size vs checkpoint", f"{share:.3f}%"),
             ("gates in export", result.gates)]
    if result.fold is not None:
        pairs += [("gates folded", len(result.fold.folded)), ("gates kept", len(result.fold.kept))]
    if result.unload_change is not None:
        pairs.append(("output change without gates", result.unload_change))
    if result.base is not None:
        pairs += [("base", result.base), ("base hash", result.base_hash)]
    if result.output_names:
        pairs.append(("graph outputs", ", ".join(result.output_names)))
    pairs += [("verified at inputs", ", ".join("x".join(map(str, s)) for s in result.input_shapes)),
              ("max |Δ| vs source", result.max_abs_diff)]
    print_kv("export", pairs)
    if result.fold is not None and result.fold.kept:  # one reason, as an example
        info(f"{len(result.fold.kept)} gates kept; e.g. {next(iter(result.fold.kept.values()))}")
