"""``gct-surgery inject``: gate a model's convolutions and save a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._output import info, print_json, print_kv, print_table, trust_source_option, warn

SOURCE_HELP = ("timm:NAME, timm:hf-hub:ID, timm:local-dir:PATH, torchvision:NAME, path/to/file.py:factory, "
               "package.module:factory, or a checkpoint file (.safetensors/.pt/.pth/.bin/.ckpt; "
               "timm train.py's .pth.tar and Lightning's .ckpt included)")


def parse_numbers(text: Optional[str], hint: str, kind: type = float) -> Optional[list]:
    """'0.5,0.5,0.5' -> [0.5, 0.5, 0.5] (one value serves every channel); with ``int``,
    an input size: '3,224,224' (or 3x224x224) -> [3, 224, 224]."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if kind is int and (len(values) < 2 or min(values) < 1):
        raise typer.BadParameter("give channels and spatial sizes, e.g. 3,224,224", param_hint=hint)
    if not values:
        raise typer.BadParameter("give numbers, one per input channel, e.g. 0.5,0.5,0.5", param_hint=hint)
    return values


def inject(
    source: str = typer.Argument(..., help=SOURCE_HELP, show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the gated checkpoint (.safetensors); default: NAME.gct.safetensors beside a file SOURCE, or in the current folder. An existing file is replaced only when named here."),
    arch: Optional[str] = typer.Option(None, help="Architecture of a state-dict SOURCE: timm:NAME, torchvision:NAME or file.py:factory."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for a timm/torchvision/factory SOURCE."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Pretrained weights: timm's own (from --weights when offline); for torchvision, --weights PATH (a detection or segmentation model: its backbone's)."),
    num_classes: Optional[int] = typer.Option(None, help="Classifier size to build the model with (default: a weights file's own)."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Take the EMA weights of a checkpoint that holds them (timm train.py's state_dict_ema)."),
    in_chans: Optional[int] = typer.Option(None, help="Input channels (timm models)."),
    include: List[str] = typer.Option([], help="Regex on module names; gate only matches. Repeatable."),
    exclude: List[str] = typer.Option([], help="Regex on module names; never gate matches. Repeatable."),
    min_channels: int = typer.Option(1, help="Skip convolutions with fewer input channels."),
    skip_depthwise: bool = typer.Option(False, "--skip-depthwise", help="Skip depthwise convolutions."),
    mode: str = typer.Option("l2", help="Gate embedding: l2 (paper default) or l1."),
    eps: float = typer.Option(1e-5, help="Gate epsilon."),
    after_relu: bool = typer.Option(False, "--after-relu", help="l1 mode: inputs are non-negative, skip abs()."),
    input_size: Optional[str] = typer.Option(None, help="The model's input size, e.g. 3,224,224: used for the identity check and recorded for fine-tuning and export."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean the model's inputs are normalised with, e.g. 0.5,0.5,0.5: recorded for finetune, eval, inspect and export (default: the source's own; a model that is not timm or torchvision has none)."),
    std: Optional[str] = typer.Option(None, help="Per-channel std of the normalisation, e.g. 0.5,0.5,0.5 (recorded like --mean)."),
    interpolation: Optional[str] = typer.Option(None, help="Resize interpolation: bilinear, bicubic, nearest, ... (recorded like --mean)."),
    crop_pct: Optional[float] = typer.Option(None, help="Eval centre-crop fraction, e.g. 0.875; 1.0 resizes without cropping (recorded like --mean)."),
    keep_1x1: bool = typer.Option(False, "--keep-1x1", help="Also gate convolutions whose input is 1x1 spatially (squeeze-excitation, after global pooling), where GCT's l2 embedding is just |x|."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow unpickling a whole-module file. A pickle runs code: only for files you trust."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Put a GCT gate in front of every selected convolution, check that the output is
    unchanged, and write a self-describing checkpoint."""
    size = parse_numbers(input_size, "--input-size", int)
    data = {"mean": parse_numbers(mean, "--mean"), "std": parse_numbers(std, "--std"),
            "interpolation": interpolation, "crop_pct": crop_pct}
    from ..core.gate import GateConfig
    from ..operations import default_output, inject_model, open_source, plan
    from ..core.targets import TargetSpec

    targets = TargetSpec(include=tuple(include), exclude=tuple(exclude),
                         min_channels=min_channels, skip_depthwise=skip_depthwise, keep_1x1=keep_1x1)
    gate = GateConfig(mode=mode, eps=eps, after_relu=after_relu)  # a bad --mode: one line
    if output is None and not dry_run:
        output = default_output(source)  # before the work: an existing file is refused
    opened = open_source(source, arch=arch, weights=str(weights) if weights else None,
                         pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                         use_ema=use_ema, allow_pickle=allow_pickle)
    model, meta = opened.model, opened.meta

    if dry_run:
        rows = plan(model, targets, gate, input_size=size or meta.data.get("input_size"))
        n = sum(r["action"] == "gate" for r in rows)
        if json_out:
            print_json({"plan": rows, "gates": n})
            return
        print_table("plan (nothing written)", list(rows[0].keys()), [list(r.values()) for r in rows])
        _tell(opened)
        info(f"{n} gates, {sum(r['gate_params'] for r in rows):,} parameters would be added")
        return

    result = inject_model(model, meta, targets=targets, gate=gate, output=output, input_size=size,
                          data=data)
    if json_out:
        print_json(result.to_dict())
        return
    r = result.report
    print_kv("inject", [
        ("source", source), ("gates added", r.gates_added), ("gates in model", r.gates_total),
        ("parameters added", f"{r.params_added:,} ({r.params_added_pct:.3f}%)"),
        ("base parameters", r.base_params), ("trainable parameters", r.trainable_params),
        ("identity check max |Δ|", result.max_abs_diff), ("written", str(output)),
    ])
    _tell(opened)

    for name, aliases in r.to_dict()["tied"].items():
        info(f"{name} is shared (tied) with {', '.join(aliases)}: one gate serves every use")
    if result.functional_convs:
        warn(f"{len(result.functional_convs)} convolutions are called as functions, not modules, "
             f"and are not gated: {', '.join(result.functional_convs)}")
    if result.max_abs_diff != 0.0:
        warn(f"output changed by {result.max_abs_diff:.3g} after injection")
    skipped_1x1 = [n for n, why in r.to_dict()["skipped"].items() if why.startswith("input is 1x1")]
    if skipped_1x1:
        info(f"{len(skipped_1x1)} convolutions see a 1x1 input at {result.meta.data.get('input_size')} "
             f"and were not gated (GCT's l2 embedding would be |x|; --keep-1x1 gates them)")
    recorded = result.meta.data
    if any(recorded.get(k) is None or k in recorded.get("assumed", []) for k in ("mean", "std")):
        warn("no --mean/--std recorded: finetune, eval and inspect will assume ImageNet's "
             "(0.485, 0.456, 0.406)/(0.229, 0.224, 0.225); pass the model's own with --mean and --std")


def _tell(opened) -> None:
    """What the SOURCE held (an EMA, a prefix) and what is wrong with it (random
    weights): after the result, so that an error stays the one line it should be."""
    for note in opened.notes:
        info(note)
    for warning in opened.warnings:
        warn(warning)
