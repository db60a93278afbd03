"""``gct-surgery finetune``: staged fine-tuning (gates, then everything) of a checkpoint."""
from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._output import info, is_human, labelled, print_json, print_table, warn


class StageKind(str, Enum):
    gates = "gates"
    full = "full"


class Amp(str, Enum):
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


@app.command()
def finetune(
    checkpoint: Optional[Path] = typer.Argument(None, help="A gct-surgery checkpoint (from `inject`). Not needed with --resume.", show_default=False),
    data: Optional[Path] = typer.Option(None, help="Image folder: DATA/train/CLASS/* and DATA/val/CLASS/* (or validation)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder: last/best.safetensors, metrics.csv, metrics.png, state.pt."),
    stage: Optional[StageKind] = typer.Option(None, help="Run one stage of the default recipe: gates (only gates train) or full (everything).", rich_help_panel="Stages"),
    recipe: Optional[Path] = typer.Option(None, help="Recipe file (.toml/.yaml) with several stages. Default: gates, then full.", rich_help_panel="Stages"),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run from its folder, or a whole --baseline comparison from OUT (then its verdict).", rich_help_panel="Run folder and faults"),
    epochs: Optional[int] = typer.Option(None, help="Epochs of every stage (overrides the recipe).", rich_help_panel="Stages"),
    lr: Optional[float] = typer.Option(None, help="Gate learning rate of every stage (a new head in a gates stage uses it too). The base weights keep the recipe's base_lr (1e-4 in the default recipe) unless --base-lr; a recipe stage without base_lr gives the base 0.1x this.", rich_help_panel="Stages"),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate of the base weights in full stages.", rich_help_panel="Stages"),
    batch_size: int = typer.Option(32, help="Global batch size (split among torchrun processes).", rich_help_panel="Training"),
    workers: int = typer.Option(2, help="Data loader worker processes.", rich_help_panel="Speed"),
    seed: int = typer.Option(0, help="Seed for data order, augmentation and a new head.", rich_help_panel="Training"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Training"),
    amp: Amp = typer.Option(Amp.off, help="Mixed precision: bf16 (CPU or CUDA) or fp16 (CUDA).", rich_help_panel="Training"),
    num_classes: Optional[int] = typer.Option(None, help="Replace the classifier head for this many classes (it then trains in the gates stage too).", rich_help_panel="Stages"),
    img_size: Optional[int] = typer.Option(None, help="Train and evaluate at this square input size instead of the checkpoint's.", rich_help_panel="Training"),
    no_aug: bool = typer.Option(False, "--no-aug", help="No train augmentation: resize and center crop only.", rich_help_panel="Training"),
    train_head: bool = typer.Option(False, "--train-head", help="Gates stages also train the classifier head.", rich_help_panel="Stages"),
    train_bn: bool = typer.Option(False, "--train-bn", help="Gates stages also train BatchNorm weight and bias (statistics stay frozen).", rich_help_panel="Stages"),
    ema: bool = typer.Option(False, "--ema", help="Keep a ModelEmaV3 average over every stage; validation, best.safetensors and ema.safetensors use it (last.safetensors keeps the raw weights).", rich_help_panel="Training"),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay (default: an averaging window of a tenth of the run's updates, within 0.9 to 0.9999, warmed up).", rich_help_panel="Training"),
    save_every: int = typer.Option(0, help="Also save a resumable state every N steps (0: after each epoch).", rich_help_panel="Run folder and faults"),
    task: Optional[str] = typer.Option(None, help="module:object or file.py:object giving datasets, loss and metrics for a model that is not a classifier.", rich_help_panel="Training"),
    baseline: bool = typer.Option(False, "--baseline", help="Did the gates help? Also run a control: the same recipe, stages, head handling, seed and data order with the gates held at identity (removed); print GCT minus control with a 95% interval. Runs go to OUT/seed-S/{gct,control}.", rich_help_panel="Did the gates help?"),
    seeds: int = typer.Option(1, help="With --baseline: run GCT and control for this many seeds (seed, seed+1, ...): the interval comes from their paired differences.", rich_help_panel="Did the gates help?"),
    plain: bool = typer.Option(False, "--plain", help="With --baseline: also run the plain fine-tune you would otherwise run (every parameter, no gates, one full stage of the same total epochs) as a second reference.", rich_help_panel="Did the gates help?"),
    metrics_format: str = typer.Option("csv", help="csv or jsonl.", rich_help_panel="Run folder and faults"),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image, naming it, instead of skipping and counting it.", rich_help_panel="Run folder and faults"),
    skip_nonfinite: Optional[int] = typer.Option(None, help="Skip up to N batches whose loss is NaN or infinite before stopping (default 0; may be raised with --resume).", rich_help_panel="Run folder and faults"),
    impl: str = typer.Option("fast", help="Gate implementation: fast (fused forward and backward) or reference (the official formulation), for comparison.", rich_help_panel="Speed"),
    fast_frozen: bool = typer.Option(True, "--fast-frozen/--no-fast-frozen", help="Gates stages: run the frozen base the cheap way (convs save nothing for backward, frozen BN folded into its conv). Same results up to float rounding.", rich_help_panel="Speed"),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Fine-tune a gated checkpoint in stages: gates first, everything else frozen, then everything.

    Runs under `torchrun --nproc-per-node N gct-surgery finetune ...` too."""
    from ..train import distributed

    if resume is None:
        if checkpoint is None:
            raise typer.BadParameter("give a CHECKPOINT, or --resume RUN_DIR", param_hint="CHECKPOINT")
        if data is None:
            raise typer.BadParameter("give the image folder", param_hint="--data")
        if out is None:
            raise typer.BadParameter("give the run folder", param_hint="--out")
        if stage is not None and recipe is not None:
            raise typer.BadParameter("give --stage or --recipe, not both", param_hint="--stage")
    if (seeds != 1 or plain) and not baseline:
        raise typer.BadParameter("--seeds and --plain go with --baseline", param_hint="--seeds")
    from ..train.compare import compare, is_comparison, resume_comparison
    from ..train.config import TrainConfig
    from ..train.faults import Interrupted
    from ..train.loop import finetune as run_finetune, resume as run_resume
    from ..train.recipe import default_recipe, load_recipe

    reporter = Reporter(quiet=json_out)
    try:
        if resume is not None:  # a run, or a whole --baseline comparison (its verdict at the end)
            baseline = is_comparison(resume)
            again = resume_comparison if baseline else run_resume
            result = again(resume, on_event=reporter, data=str(data) if data else None,
                           strict=True if strict else None, skip_nonfinite=skip_nonfinite)
        else:
            chosen = load_recipe(recipe) if recipe is not None else default_recipe()
            if stage is not None:
                chosen = chosen.only(stage.value)
            chosen = chosen.override(epochs=epochs, lr=lr, base_lr=base_lr,
                                     train_head=True if train_head else None,
                                     train_bn=True if train_bn else None)
            config = TrainConfig(data=str(data), out=str(out), batch_size=batch_size, workers=workers,
                                 seed=seed, device=device, amp=amp.value, num_classes=num_classes,
                                 img_size=img_size, augment=not no_aug, ema=ema,
                                 ema_decay=ema_decay, save_every=save_every, task=task,
                                 metrics_format=metrics_format, strict=strict,
                                 skip_nonfinite=skip_nonfinite or 0, fast_frozen=fast_frozen, impl=impl)
            if baseline:
                result = compare(checkpoint, chosen, config, seeds=seeds, plain=plain, on_event=reporter)
            else:
                result = run_finetune(checkpoint, chosen, config, on_event=reporter)
        reporter.close()
    except Interrupted as e:  # the state is on disk; the Reporter said how to resume
        reporter.close()
        if e.hard and _rank() == 0:  # a second signal: say what stopped and what is on disk
            whole = f"; the whole comparison continues with --resume {resume or out}" if baseline else ""
            warn(f"{e}{whole}")
        if json_out and _rank() == 0:
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                print_json({"interrupted": True, "signal": e.signum, "run_dir": str(resume or out)})
        raise typer.Exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
    finally:
        reporter.close()
        distributed.cleanup()

    if _rank() != 0:  # under torchrun only rank 0 prints
        return
    if json_out:
        print_json(result.to_dict())
    elif baseline:
        _print_comparison(result)
    else:
        _print_run(result)


def _print_run(result, label: str = "") -> None:
    from ..train.images import report_lines

    for line in report_lines(result.data):
        warn(f"{label}{line}")
    if result.nonfinite_skipped:
        warn(f"{label}{result.nonfinite_skipped} batch(es) with a non-finite loss were skipped (--skip-nonfinite)")
    best = result.best or {}
    names = ("val_loss", *result.metric_names)
    info(f"{label}done in {result.seconds:.1f} s: best {', '.join(f'{k} {best[k]:.4g}' for k in names if k in best)} "
         f"(epoch {best.get('epoch')}, stage {best.get('stage')}); written to {result.run_dir}")


def _print_comparison(comparison) -> None:
    """Per seed, the final and best primary metric of each run, then the verdict."""
    key = comparison.metric
    rows = []
    for runs in comparison.runs:
        for arm in ("gct", "control", "plain"):
            r = getattr(runs, arm)
            if r is None:
                continue
            gates = next((s["max_abs_gamma"] for s in r.stages if "max_abs_gamma" in s), None)
            rows.append([runs.seed, arm, (r.last or {}).get(key), (r.best or {}).get(key),
                         max(s["trainable_params"] for s in r.stages) if r.stages else 0,
                         "-" if gates is None else gates, r.seconds])
    print_table(f"GCT against the same protocol without gates ({key}, final epoch)",
                ["seed", "run", f"final {key}", f"best {key}", "trainable", "max |gamma|", "seconds"], rows)
    v = comparison.verdict
    info(v.text)
    if comparison.plain_verdict is not None:
        info(comparison.plain_verdict.text)
    info(f"runs in {comparison.out}/seed-*/; comparison.json and metrics.png beside them")


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


class Reporter:
    """Turns training events into rich progress bars (ETA, images/s) on a terminal and
    plain lines elsewhere; silent with --json."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.title = ""
        self.progress = None
        self.task_id = None
        self.stage = None
        self.bad_seen = 0

    def __call__(self, event: str, payload: dict) -> None:
        if self.quiet:
            return
        if "arm" in payload:  # a comparison: say which run the line is about
            self.title = f"{payload['arm']} (seed {payload['seed']}): "
        getattr(self, f"on_{event}", lambda p: None)(payload)

    def on_stage_start(self, p: dict) -> None:
        self.stage = p
        info(f"{self.title}stage {p['stage']} ({p['kind']}): {p['epochs']} epochs x "
             f"{p['steps_per_epoch']} steps, {p['trainable']:,} trainable parameters")
        if is_human():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn())
                self.progress.start()
            total = p["epochs"] * p["steps_per_epoch"]
            done = p["epoch"] * p["steps_per_epoch"] + p["step"]
            self.task_id = self.progress.add_task(f"{self.title}{p['stage']}", total=total,
                                                  completed=done, speed="")

    def on_stage_end(self, p: dict) -> None:
        g = p.get("summary", {}).get("gates")
        if g:
            self._say(f"{self.title}after stage {p['stage']}: gates {g['state']} (max |gamma| "
                      f"{g['max_abs_gamma']:.3g}, max |beta| {g['max_abs_beta']:.3g}; "
                      f"{g['active_gates']} of {g['gates']} gates at 0.1 or more)")

    def on_step(self, p: dict) -> None:
        if self.progress is not None and self.task_id is not None:
            t = self.progress.tasks[self.task_id]
            speed = f"{t.speed * p['images']:.0f} img/s" if t.speed else ""
            self.progress.update(self.task_id, advance=1, speed=f"loss {p['loss']:.3f} {speed}")

    def on_epoch_end(self, p: dict) -> None:
        r = p["row"]
        metrics = " ".join(f"{k} {v:.4g}" for k, v in r.items()
                           if k not in ("epoch", "stage", "seconds", "images_per_s") and isinstance(v, float))
        speed = f", {r['seconds']:.1f} s, {r['images_per_s']} img/s" if r["seconds"] else ""
        self._say(f"{self.title}epoch {r['epoch']} ({r['stage']}): {metrics}{speed}"
                  f"{' *best*' if p['improved'] else ''}")

    def _say(self, line: str) -> None:
        if self.progress is not None:  # above the live bar, never inside it
            self.progress.console.print(line, highlight=False, markup=False)
        else:
            info(line)

    def on_resumed(self, p: dict) -> None:
        info(f"{self.title}resumed at stage {p['stage_index'] + 1}, epoch {p['epoch'] + 1}, step {p['step']}")

    def on_interrupted(self, p: dict) -> None:
        self.close()
        whole = " (the whole comparison)" if "comparison" in p else ""
        warn(f"{self.title}{p.get('signal', 'SIGINT')}: stopped at stage {p['stage']}, epoch {p['epoch'] + 1}, "
             f"step {p['step']}; state saved. Continue with: gct-surgery finetune --resume "
             f"{p.get('comparison', p['run_dir'])}{whole}")

    def on_arm_done(self, p: dict) -> None:
        info(f"{self.title}finished before; its result is read from {p['run_dir']}/result.json")

    def on_bad_file(self, p: dict) -> None:
        self.bad_seen += 1
        if self.bad_seen <= 5:  # the rest are counted in the report at the end
            self._warn(f"skipped unreadable image {p['path']}: {p['reason']}")

    def on_nonfinite_skipped(self, p: dict) -> None:
        self._warn(f"non-finite loss ({p['loss']}) at stage {p['stage']}, epoch {p['epoch'] + 1}, "
                   f"step {p['step']}: batch skipped ({p['skipped']} of {p['allowed']} allowed)")

    def _warn(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(labelled("warning", "yellow", message), soft_wrap=True)
        else:
            warn(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
