"""``gct-surgery demo``: the whole pipeline on bundled data, offline, in minutes."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._output import info, print_json, print_table


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the data, models and runs."),
    model: str = typer.Option("timm:resnet10t", help="The small CNN that plays the user's existing model."),
    img_size: int = typer.Option(32, help="Square input size."),
    pretrain_epochs: int = typer.Option(5, help="Epochs that train the 'existing model'."),
    gates_epochs: int = typer.Option(2, help="Epochs of the gates stage."),
    full_epochs: int = typer.Option(3, help="Epochs of the full stage."),
    workers: Optional[int] = typer.Option(None, help="Data loader worker processes (default: auto, as finetune).", show_default="auto"),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads (default: auto).", show_default="auto"),
    force: bool = typer.Option(False, "--force", help="Replace an earlier demo in --out."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Run the real pipeline on a bundled Fashion-MNIST subset: train a small model,
    inject, fine-tune the gates, then everything, export, evaluate, and compare with a
    control: the same recipe with the gates held at identity."""
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(out=str(out), model=model, img_size=img_size,
                            pretrain_epochs=pretrain_epochs, gates_epochs=gates_epochs,
                            full_epochs=full_epochs, workers=workers, threads=threads,
                            force=force)
    result = run_demo(settings, on_event=None if json_out else _progress)
    if json_out:
        print_json(result.to_dict())
        return
    print_table("gct-surgery demo", ["step", "top-1", "top-5", "seconds", "output"],
                [[s.name, _pct(s.top1), _pct(s.top5), f"{s.seconds:.1f}", s.output or ""]
                 for s in result.steps])
    info(f"gates: {result.gates}; parameters added: {result.params_added:,} "
         f"({100 * result.params_added / max(result.params_base, 1):.2f}% of {result.params_base:,}); "
         f"total {result.seconds:.0f} s")
    if result.verdict:
        info(f"did the gates help? {result.verdict['text']}")
    info("files written:")
    for f in result.files:
        info(f"  {f}")
    info("the same steps by hand:")
    for c in result.commands:
        info(f"  {c}")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _progress(kind: str, payload: dict) -> None:
    if kind == "step_start":
        info(payload["name"], style="bold")
    elif kind == "step_end":
        extra = f", top-1 {payload['top1']:.1f}%" if payload.get("top1") is not None else ""
        info(f"  done in {payload['seconds']:.1f} s{extra}")
    elif kind == "epoch_end":
        r = payload["row"]
        info(f"  epoch {r['epoch']} ({r['stage']}): val top-1 {r.get('top1', float('nan')):.1f}%, "
             f"{r['seconds']:.1f} s")
