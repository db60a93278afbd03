"""``gct-surgery eval``: loss, top-1, top-5 and per-class accuracy of a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from ._output import print_json, print_kv, print_table, warn


@app.command(name="eval")
def eval_(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint.", show_default=False),
    data: Path = typer.Option(..., help="Image folder with DATA/SPLIT/CLASS/*."),
    split: str = typer.Option("val", help="Split folder to evaluate: val (or validation), train, test."),
    batch_size: int = typer.Option(64, help="Batch size."),
    workers: int = typer.Option(2, help="Data loader worker processes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    img_size: Optional[int] = typer.Option(None, help="Evaluate at this square input size instead of the checkpoint's."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image, naming it, instead of skipping and counting it."),
    impl: str = typer.Option("fast", help="Gate implementation: fast or reference."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Evaluate a checkpoint on an image-folder split: loss, top-1, top-5, per-class accuracy."""
    from ..train.data import report_lines
    from ..train.loop import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, data, split=split, batch_size=batch_size,
                            workers=workers, device=device, img_size=img_size, strict=strict,
                            impl=impl)
    if json_out:
        print_json(r.to_dict())
        return
    print_kv(f"eval {checkpoint.name} on {split}", [
        ("images", r.samples), ("loss", r.loss), ("top-1 %", r.top1), ("top-5 %", r.top5)])
    print_table("per-class accuracy", ["class", "images", "top-1 %"],
                [[c["class"], c["images"], c["top1"]] for c in r.per_class])
    for line in report_lines(r.data):
        warn(line)
