"""``gct-surgery demo``: the whole pipeline on bundled data, offline, and a verdict over
several seeds, in about two minutes on 2 CPU cores."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._output import info, print_json, print_table, warn


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o",
                             help="Folder for the data, models and runs."),
    model: str = typer.Option("timm:resnet10t",
                              help="The small CNN that plays the user's existing model."),
    img_size: int = typer.Option(32, help="Square input size."),
    pretrain_epochs: int = typer.Option(3, help="Epochs that train the 'existing model'."),
    gates_epochs: int = typer.Option(1, help="Epochs of the gates stage."),
    full_epochs: int = typer.Option(1, help="Epochs of the full stage."),
    seeds: int = typer.Option(3, help="Paired seeds of GCT and its control for the verdict "
                                      "(seed 0's GCT arm is the fine-tune that is exported)."),
    batch_size: int = typer.Option(128, help="Global batch size of every training step."),
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
    share = 100 * result.params_added / max(result.params_base, 1)
    info(f"gates: {result.gates}; parameters added: {result.params_added:,} "
         f"({share:.2f}% of {result.params_base:,}); total {result.seconds:.0f} s")
    for s in result.stages:
        gamma = s.get("max_abs_gamma")
        info(f"  stage {s['name']} (GCT, seed {result.seeds[0].seed}): "
             f"{s.get('trained', s['kind'])}; {s.get('steps', 0)} steps, "
             f"{s['trainable_params']:,} parameters"
             + ("" if gamma is None else f", max |gamma| {gamma:.3g} at its end"))
    print_table("GCT against its control, per seed (final epoch)",
                ["seed", "GCT top-1", "control top-1", "GCT - control", "seconds"],
                [[d.seed, _pct(d.gct), _pct(d.control), _signed(d.difference),
                  f"{d.seconds:.1f}"] for d in result.seeds])
    _print_verdict(result.verdict)
    info("files written:")
    for f in result.files:
        info(f"  {f}")
    info("the same steps by hand:")
    for c in result.commands:
        info(f"  {c}")


def _print_verdict(v: dict) -> None:
    """The conclusion, the difference, its interval, the MDE and the seeds; then the
    sentence that says what they mean."""
    if not v:
        warn("no verdict (the comparison gave none)")
        return
    ci = v.get("ci95")
    unit = f" {v['metric']}"
    info("did the gates help?", style="bold")
    info(f"  conclusion: {v['conclusion']}", style="bold")
    info(f"  difference (GCT - control): {_signed(v.get('difference'))}{unit}, mean over "
         f"{v['seeds']} seed{'s' if v['seeds'] != 1 else ''} x {v.get('images', '?')} images")
    info(f"  95% interval: {_signed(ci[0])} to {_signed(ci[1])}" if ci else
         "  95% interval: none")
    mde = v.get("mde")
    info(f"  MDE (80% power): {mde:.2f}{unit}" if mde is not None else
         "  MDE: unknown with one seed")
    if v.get("resolution") is not None:
        info(f"  resolution (equivalence bound): ±{v['resolution']:g}{unit}")
    info(f"  {v['text']}")


def _counts(text: Optional[str]):
    if text is None:
        return None
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) not in (1, 2) or min(counts) < 1:
        raise typer.BadParameter(f"{text!r}: give TRAIN,VAL counts, e.g. 30,20",
                                 param_hint="--per-class")
    return counts * 2 if len(counts) == 1 else counts


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _signed(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.2f}"


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
