"""``gct-surgery demo``: the whole pipeline on bundled data, offline, and a verdict over
several seeds, in about two minutes on 2 CPU cores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._output import info, print_json, print_table
from .verdict import print_comparison


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o",
                             help="Folder for the data, models and runs."),
    model: str = typer.Option("timm:resnet10t",
                              help="The small CNN that plays the user's existing model."),
    img_size: int = typer.Option(32, min=1, help="Square input size."),
    pretrain_epochs: int = typer.Option(3, min=1, help="Epochs that train the 'existing model'."),
    gates_epochs: int = typer.Option(1, min=1, help="Epochs of the gates stage."),
    full_epochs: int = typer.Option(1, min=1, help="Epochs of the full stage."),
    seeds: int = typer.Option(3, min=1, help="Paired seeds of GCT and its control for the "
                              "verdict (seed 0's GCT arm is the fine-tune that is exported)."),
    batch_size: int = typer.Option(128, min=1, help="Global batch size of every training step."),
    per_class: Optional[str] = typer.Option(
        None, metavar="TRAIN,VAL", show_default="all: 300,100",
        help="Use only this many bundled train and val images a class (a quicker, "
             "noisier demo)."),
    workers: Optional[int] = typer.Option(
        None, help="Data loader worker processes (default: auto, as finetune).",
        show_default="auto"),
    threads: Optional[int] = typer.Option(
        None, help="torch intra-op threads (default: auto).", show_default="auto"),
    force: bool = typer.Option(False, "--force", help="Replace an earlier demo in --out."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Run the real pipeline on a bundled Fashion-MNIST subset: train a small model,
    inject, fine-tune the gates, then everything, export, evaluate; and compare with a
    control (the same recipe with gamma held at 0) over several seeds: did GCT help?"""
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(out=str(out), model=model, img_size=img_size,
                            pretrain_epochs=pretrain_epochs, gates_epochs=gates_epochs,
                            full_epochs=full_epochs, seeds=seeds, batch_size=batch_size,
                            per_class=_counts(per_class), workers=workers, threads=threads,
                            force=force)
    result = run_demo(settings, on_event=None if json_out else _progress)
    if json_out:
        print_json(result.to_dict())
        return
    print_table("gct-surgery demo", ["step", "top-1", "top-5", "seconds", "output"],
                [[s.name, _pct(s.top1), _pct(s.top5), f"{s.seconds:.1f}", s.output or ""]
                 for s in result.steps])
    added, base = result.injected.params_added, result.injected.base_params
    info(f"gates: {result.injected.gates_total}; parameters added: {added:,} "
         f"({100 * added / max(base, 1):.2f}% of {base:,}); total {result.seconds:.0f} s")
    print_comparison(result.comparison)
    info("\n  ".join(["files written:", *result.files]))
    info("\n  ".join(["the same steps by hand:", *result.commands]))


def _counts(text: Optional[str]):
    """TRAIN,VAL (or one count for both) as (train, val)."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"{text!r}: give TRAIN,VAL counts, e.g. 30,20",
                                 param_hint="--per-class")
    return tuple(int(p) for p in parts * 2)[:2]


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _progress(kind: str, payload: dict) -> None:
    who = f"{payload['arm']} (seed {payload['seed']}): " if "arm" in payload else ""
    if kind == "step_start":
        info(payload["name"], style="bold")
    elif kind == "step_end":
        extra = f", top-1 {payload['top1']:.1f}%" if payload.get("top1") is not None else ""
        info(f"  done in {payload['seconds']:.1f} s{extra}")
    elif kind == "epoch_end":
        r = payload["row"]
        info(f"  {who}epoch {r['epoch']} ({r['stage']}): val top-1 "
             f"{r.get('top1', float('nan')):.1f}%, {r['seconds']:.1f} s")
    elif kind == "seed_done":
        arms = ", ".join(f"{a} {payload[a]:.1f}%" for a in ("gct", "control")
                         if payload.get(a) is not None)
        info(f"  seed {payload['seed']} done: final top-1 {arms}")
