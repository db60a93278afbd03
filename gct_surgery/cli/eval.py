"""``gct-surgery eval``: the loss and the task's metrics of a checkpoint (top-1, top-5 and
per-class accuracy for a classifier)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._output import (GateImpl, OutputKind, Split, print_json, print_kv, print_table,
                      trust_source_option, warn)


def eval_(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint.", show_default=False),
    data: Path = typer.Option(..., help=(
        "Data folder: DATA/SPLIT/CLASS/* or DATA/SPLIT.csv (path,label) for a classifier "
        "(a train-only folder: val is the share the run held out), else what the task reads.")),
    split: Split = typer.Option(
        Split.val, help="Split folder to evaluate (validation is read as val)."),
    batch_size: int = typer.Option(64, help="Batch size."),
    workers: Optional[int] = typer.Option(
        None, help="Data loader worker processes (default: auto, 0 on CPU, a few on CUDA).",
        show_default="auto", rich_help_panel="Speed"),
    threads: Optional[int] = typer.Option(
        None, help="torch intra-op threads (default: auto, this process's share of the cores).",
        show_default="auto", rich_help_panel="Speed"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    img_size: Optional[int] = typer.Option(
        None, help="Evaluate at this square input size instead of the checkpoint's."),
    strict: bool = typer.Option(
        False, "--strict", help="Stop at the first unreadable image, naming it, instead of "
        "leaving it out and reporting it."),
    impl: GateImpl = typer.Option(
        GateImpl.fast, help="Gate implementation: fast (fused) or reference (the official "
        "formulation)."),
    task: Optional[str] = typer.Option(None, help=(
        "classification, saliency, segmentation, or module:object / file.py:object scoring "
        "the model; default: the task the checkpoint was fine-tuned with.")),
    outputs: Optional[OutputKind] = typer.Option(None, help=(
        "--task saliency: the model gives probabilities or logits; default: as recorded.")),
    class_map: Optional[Path] = typer.Option(
        None, help="timm class map fixing the class order, for a checkpoint that records no "
        "class names."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Evaluate a checkpoint on a split: loss and the task's metrics (for a classifier:
    top-1, top-5, per-class accuracy)."""
    from ..train.data import report_lines
    from ..train.evaluate import evaluate_checkpoint

    split = split.value
    r = evaluate_checkpoint(checkpoint, data, split=split, batch_size=batch_size,
                            workers=workers, threads=threads, device=device,
                            img_size=img_size, strict=strict, impl=impl.value, task=task,
                            outputs=outputs.value if outputs else None,
                            class_map=str(class_map) if class_map else None)
    if json_out:
        print_json(r.to_dict())
        return
    print_kv(f"eval {checkpoint.name} on {split} ({r.task})",
             [("images", r.samples), *r.metrics.items()])
    if r.breakdown:
        columns = list(r.breakdown[0])
        print_table(r.breakdown_title, columns,
                    [[row.get(c) for c in columns] for row in r.breakdown])
    for line in report_lines(r.data):
        warn(line)
