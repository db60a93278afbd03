"""``gct-surgery finetune``: staged fine-tuning (gates, then everything) of a checkpoint."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from ._output import (Amp, Control, GateImpl, MetricsFormat, OutputKind, StageKind, console,
                      given_options, info, is_human, labelled, plural, print_json, short_number,
                      trust_source_option, warn)


COMPARE = "Did the gates help?"




def finetune(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Argument(None, help="A gct-surgery checkpoint (from `inject`). Not needed with --resume.", show_default=False),
    data: Optional[Path] = typer.Option(None, help="Image folder: DATA/train/CLASS/* and DATA/val/CLASS/* (or validation), or DATA/train.csv and DATA/val.csv (path,label), or train only with --val-split."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder: last/best.safetensors, metrics.csv, metrics.png, state.pt."),
    stage: Optional[StageKind] = typer.Option(None, help="Run one stage of the default recipe: gates (only gates train) or full (everything).", rich_help_panel="Stages"),
    recipe: Optional[Path] = typer.Option(None, help="Recipe file (.toml/.yaml) with several stages. Default: gates, then full.", rich_help_panel="Stages"),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run from its folder, or a whole --baseline comparison from OUT (then its verdict).", rich_help_panel="Run folder and faults"),
    force: bool = typer.Option(False, "--force", help="Replace the run (or comparison) already in --out; never one a live run holds, never a folder that is not a run's.", rich_help_panel="Run folder and faults"),
    epochs: Optional[str] = typer.Option(None, help="Epochs of every stage, or per stage as STAGE=N,... (e.g. gates=2,full=3); overrides the recipe.", rich_help_panel="Stages"),
    lr: Optional[str] = typer.Option(None, help="Gate learning rate of every stage, or per stage as STAGE=LR,... (a new head in a gates stage uses it too). The base weights keep the recipe's base_lr (1e-4 in the default recipe) unless --base-lr; a recipe stage without base_lr gives the base 0.1x this.", rich_help_panel="Stages"),
    base_lr: Optional[float] = typer.Option(None, help="Learning rate of the base weights in full stages.", rich_help_panel="Stages"),
    batch_size: int = typer.Option(32, min=1, help="Global batch size (split among torchrun processes).", rich_help_panel="Training"),
    workers: Optional[int] = typer.Option(None, help="Data loader worker processes (default: auto, 0 on CPU, a few on CUDA; the run's first line says what was chosen).", show_default="auto", rich_help_panel="Speed"),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads per process (default: auto, this process's share of the cores).", show_default="auto", rich_help_panel="Speed"),
    seed: int = typer.Option(0, help="Seed for data order, augmentation and a new head.", rich_help_panel="Training"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Training"),
    amp: Amp = typer.Option(Amp.off, help="Mixed precision: bf16 (CPU or CUDA) or fp16 (CUDA).", rich_help_panel="Training"),
    num_classes: Optional[int] = typer.Option(None, min=1, help="Replace the classifier head for this many classes (it then trains in the gates stage too).", rich_help_panel="Stages"),
    img_size: Optional[int] = typer.Option(None, help="Train and evaluate at this square input size instead of the checkpoint's.", rich_help_panel="Training"),
    no_aug: bool = typer.Option(False, "--no-aug", help="No train augmentation: resize and center crop only.", rich_help_panel="Training"),
    train_head: bool = typer.Option(False, "--train-head", help="Gates stages also train the classifier head.", rich_help_panel="Stages"),
    train_bn: bool = typer.Option(False, "--train-bn", help="Gates stages also train BatchNorm weight and bias (statistics stay frozen).", rich_help_panel="Stages"),
    ema: bool = typer.Option(False, "--ema", help="Keep a ModelEmaV3 average over every stage; validation, best.safetensors and ema.safetensors use it (last.safetensors keeps the raw weights).", rich_help_panel="Training"),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay (default: an averaging window of a tenth of the run's updates, within 0.9 to 0.9999, warmed up).", rich_help_panel="Training"),
    save_every: int = typer.Option(0, help="Also save a resumable state every N steps (0: after each epoch).", rich_help_panel="Run folder and faults"),
    task: Optional[str] = typer.Option(None, help="What the model does, if not classification: saliency, segmentation (masks beside the images, docs/dense.md), or module:object / file.py:object giving datasets, loss and metrics.", rich_help_panel="Training"),
    outputs: Optional[OutputKind] = typer.Option(None, help="--task saliency: the model gives probabilities (it ends in a sigmoid, as U^2-Net does) or logits; never guessed.", rich_help_panel="Training"),
    iou_loss: bool = typer.Option(False, "--iou-loss", help="--task saliency: add the IoU loss to BCE.", rich_help_panel="Training"),
    baseline: bool = typer.Option(
        False, "--baseline", rich_help_panel=COMPARE,
        help="Did the gates help? Also run a control on the same budget (the same recipe, stages, "
             "steps, learning rates, head handling, seed and data order; see --control); print "
             "GCT minus control, paired image by image, with its interval and a conclusion. Runs "
             "go to OUT/seed-S/{gct,control}."),
    control: Control = typer.Option(
        Control.static, rich_help_panel=COMPARE,
        help="With --baseline: static (every gate's gamma held at 0: fixed per-channel scales "
             "that train like GCT's gates and fold away at export) or identity (gates removed; "
             "BatchNorm affine trains where only gates would)."),
    seeds: str = typer.Option(
        "1", metavar="N|auto", rich_help_panel=COMPARE,
        help="With --baseline: a number of paired seeds (seed, seed+1, ...), or auto: add seeds, "
             "at least 2, until the verdict is decided or --max-seeds (the error rate is spent "
             "over the looks)."),
    max_seeds: int = typer.Option(10, help="With --seeds auto: the most seeds to run.",
                                  rich_help_panel=COMPARE),
    resolution: Optional[float] = typer.Option(
        None, show_default="per metric", rich_help_panel=COMPARE,
        help="With --baseline: the smallest difference that matters (the equivalence bound). "
             "Default: 0.5 points of top-1; docs/verdict.md lists the others."),
    seed_index: Optional[int] = typer.Option(
        None, rich_help_panel=COMPARE,
        help="With --baseline: run only seed --seed + K into OUT/seed-S/ and nothing else (one "
             "job of many, e.g. a Slurm array task; --seeds N: how many in all); then "
             "gct-surgery verdict OUT."),
    plain: bool = typer.Option(
        False, "--plain", rich_help_panel=COMPARE,
        help="With --baseline: also run the plain fine-tune you would otherwise run (every "
             "parameter, no gates, one full stage of the same total epochs, the recipe's "
             "BatchNorm handling and head learning rate) as a second reference."),
    metrics_format: MetricsFormat = typer.Option(MetricsFormat.csv, help="Format of the metrics file: metrics.csv or metrics.jsonl.", rich_help_panel="Run folder and faults"),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image, naming it, instead of skipping and counting it.", rich_help_panel="Run folder and faults"),
    skip_nonfinite: Optional[int] = typer.Option(None, min=0, help="Skip up to N batches whose loss is NaN or infinite before stopping (default 0; may be raised with --resume).", rich_help_panel="Run folder and faults"),
    impl: GateImpl = typer.Option(GateImpl.fast, help="Gate implementation: fast (fused forward and backward) or reference (the official formulation), for comparison.", rich_help_panel="Speed"),
    opt: Optional[str] = typer.Option(None, help="timm optimizer name (adamw, sgd, lamb...). One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    sched: Optional[str] = typer.Option(None, help="timm scheduler name (cosine, step, tanh, poly, constant...), stepped per update. One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    warmup: Optional[str] = typer.Option(None, help="Fraction of a stage's updates spent warming up (0 <= w < 1). One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    weight_decay: Optional[str] = typer.Option(None, help="Weight decay of base weights with more than one dimension (gate beta, biases and norms never decay). One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    smoothing: Optional[str] = typer.Option(None, help="Label smoothing (timm LabelSmoothingCrossEntropy; folded into mixup's targets when mixing). One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    mixup: Optional[str] = typer.Option(None, help="timm Mixup alpha (0: off); classification, or a --task with soft_targets. One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    cutmix: Optional[str] = typer.Option(None, help="timm CutMix alpha (0: off); with --mixup, each batch picks one. One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    clip_grad: Optional[str] = typer.Option(None, help="Clip the gradient norm to this before each update. One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    grad_accum: Optional[str] = typer.Option(None, help="Accumulate N batches of --batch-size per update (an update sees N x batch). One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    layer_decay: Optional[str] = typer.Option(None, help="Layer-wise lr decay: each layer nearer the input gets this factor more (timm's grouping; gates follow their conv). One value for every stage, or STAGE=VALUE,...", rich_help_panel="Training knobs"),
    channels_last: bool = typer.Option(False, "--channels-last", help="Model and inputs in channels-last memory format (faster convs on GPUs).", rich_help_panel="Training knobs"),
    drop_path: float = typer.Option(0.0, help="Stochastic depth rate: the timm model is rebuilt with drop_path_rate (recorded in the checkpoint).", rich_help_panel="Training knobs"),
    val_split: Optional[float] = typer.Option(None, help="No val split in DATA: hold out this share of each class of train (e.g. 0.2), chosen by --seed; eval --split val then scores the same files.", rich_help_panel="Data"),
    class_map: Optional[Path] = typer.Option(None, help="timm class map (.txt, one class name per line, in label order): fixes the class order and head indices.", rich_help_panel="Data"),
    crop_scale: Optional[float] = typer.Option(None, help="Random resized crop keeps at least this share of the image (default 0.5; timm's from-scratch 0.08).", rich_help_panel="Data"),
    hflip: Optional[float] = typer.Option(None, min=0, max=1, help="Horizontal flip probability (default 0.5; 0 for text or asymmetric images).", rich_help_panel="Data"),
    color_jitter: Optional[float] = typer.Option(None, min=0, help="Colour jitter strength (default 0.1; timm's from-scratch 0.4; 0: off).", rich_help_panel="Data"),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable result."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Fine-tune a gated checkpoint in stages: gates first, everything else frozen, then everything.

    Runs under `torchrun --nproc-per-node N gct-surgery finetune ...` too."""
    needed = (("CHECKPOINT", checkpoint is None, "give a CHECKPOINT, or --resume RUN_DIR"),
              ("--data", data is None, "give the image folder"),
              ("--out", out is None, "give the run folder"),
              ("--stage", stage is not None and recipe is not None,
               "give --stage or --recipe, not both"))
    for hint, wrong, what in needed if resume is None else ():
        if wrong:
            raise typer.BadParameter(what, param_hint=hint)
    comparing = {"--seeds": seeds != "1", "--plain": plain, "--seed-index": seed_index is not None,
                 "--control": control != Control.static, "--resolution": resolution is not None}
    if not baseline and any(comparing.values()):
        given = next(k for k, v in comparing.items() if v)
        raise typer.BadParameter(f"{given} goes with --baseline", param_hint=given)
    n_seeds = _seeds(seeds, given=ctx.get_parameter_source("seeds").name == "COMMANDLINE",
                     one_job=seed_index is not None)
    from ..train.config import RESUMABLE, TrainConfig
    from ..train.faults import Interrupted
    from ..train.loop import finetune as run_finetune, resume as run_resume
    from ..train import distributed
    from ..train.compare import compare, resume_comparison
    from ..train.outputs import is_comparison, replace_run
    from ..train.recipe import default_recipe, load_recipe

    reporter = Reporter(quiet=json_out)
    try:
        if resume is not None:  # a run, or a whole --baseline comparison (its verdict at the end)
            baseline = is_comparison(resume)
            again = resume_comparison if baseline else run_resume
            result = again(resume, on_event=reporter, data=str(data) if data else None,
                           strict=True if strict else None, skip_nonfinite=skip_nonfinite,
                           epochs=_resume_epochs(epochs),
                           fixed=given_options(ctx, besides={*RESUMABLE, "resume", "json_out",
                                                             "trust_source"}))
        else:
            chosen = load_recipe(recipe) if recipe is not None else default_recipe()
            if stage is not None:
                chosen = chosen.only(stage.value)
            chosen = chosen.override(epochs=epochs, lr=lr, opt=opt, sched=sched, warmup=warmup,
                                     weight_decay=weight_decay, smoothing=smoothing, mixup=mixup,
                                     cutmix=cutmix, clip_grad=clip_grad, grad_accum=grad_accum,
                                     layer_decay=layer_decay, base_lr=base_lr,
                                     train_head=True if train_head else None,
                                     train_bn=True if train_bn else None)
            config = TrainConfig(data=str(data), out=str(out), batch_size=batch_size, workers=workers, threads=threads,
                                 seed=seed, device=device, amp=amp.value, num_classes=num_classes,
                                 img_size=img_size, augment=not no_aug, ema=ema,
                                 ema_decay=ema_decay, save_every=save_every, task=task,
                                 outputs=outputs.value if outputs else None, iou_loss=iou_loss,
                                 metrics_format=metrics_format.value, strict=strict,
                                 skip_nonfinite=skip_nonfinite or 0, impl=impl.value,
                                 channels_last=channels_last, drop_path=drop_path, val_split=val_split,
                                 class_map=str(class_map) if class_map else None,
                                 **{k: v for k, v in (('crop_scale', crop_scale), ('hflip', hflip),
                                                      ('color_jitter', color_jitter)) if v is not None})
            if force:  # a --seed-index job replaces its own seed only: the others may be running
                replace_run(out if seed_index is None else out / f"seed-{seed + seed_index}")
            if baseline:
                result = compare(checkpoint, chosen, config, seeds=n_seeds, max_seeds=max_seeds,
                                 plain=plain, control=control.value, resolution=resolution,
                                 seed_index=seed_index, on_event=reporter)
            else:
                result = run_finetune(checkpoint, chosen, config, on_event=reporter)
    except Interrupted as e:  # the state is on disk; the Reporter said how to resume
        reporter.close()  # before warn: stderr would cut into a live bar
        if e.hard and distributed.is_main_process():  # a second signal: what stopped, on disk
            target = resume or (out if seed_index is None else out / f"seed-{seed + seed_index}")
            whole = f"; the whole comparison continues with --resume {target}" if baseline else ""
            warn(f"{e}{whole}")
        if json_out and distributed.is_main_process():
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                print_json({"interrupted": True, "signal": e.signum, "run_dir": str(resume or out)})
        raise typer.Exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
    finally:
        reporter.close()
        distributed.cleanup()

    if not distributed.is_main_process():  # under torchrun only rank 0 prints
        return
    if json_out:
        print_json(result.to_dict())
    elif baseline:
        from .verdict import print_comparison

        print_comparison(result)
    else:
        _print_run(result)


def _print_run(result) -> None:
    from ..train.data import report_lines

    for line in report_lines(result.data):
        warn(line)
    if result.nonfinite_skipped:
        warn(f"{result.nonfinite_skipped} batch(es) with a non-finite loss were skipped (--skip-nonfinite)")
    best = result.best or {}
    names = ("val_loss", *result.metric_names)
    info(f"done in {result.seconds:.1f} s: best {', '.join(f'{k} {best[k]:.4g}' for k in names if k in best)} "
         f"(epoch {best.get('epoch')}, stage {best.get('stage')}); written to {result.run_dir}")


def _seeds(text: str, *, given: bool, one_job: bool) -> int | str | None:
    """--seeds: a whole number or auto (None: a --seed-index job that did not say how many)."""
    if text == "auto":
        return "auto"
    try:
        return int(text) if given or not one_job else None
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a whole number of seeds, or auto",
                                 param_hint="--seeds") from None


def _resume_epochs(epochs: str | None) -> int | None:
    """With --resume, --epochs is one number: the epochs of the stages not yet finished."""
    if epochs is None:
        return None
    try:
        return int(epochs)
    except ValueError:
        raise typer.BadParameter(f"{epochs!r}: with --resume give one whole number, the epochs of "
                                 "every stage not yet finished (e.g. --epochs 5)", param_hint="--epochs") from None


# --- training events as people read them: rich progress bars on a terminal, plain
# lines elsewhere, nothing under --json ----------------------------------------------

class Reporter:
    """Turns training events into rich progress bars (ETA, images/s) on a terminal and
    plain lines elsewhere; silent with --json."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.title = ""
        self.progress = None
        self.task_id = None

    def __call__(self, event: str, payload: dict) -> None:
        if self.quiet:
            return
        if "arm" in payload:  # a comparison: say which run the line is about
            self.title = f"{payload['arm']} (seed {payload['seed']}): "
        getattr(self, f"on_{event}", lambda p: None)(payload)

    def on_stage_start(self, p: dict) -> None:
        info(f"{self.title}stage {p['stage']} ({p['kind']}): {plural(p['epochs'], 'epoch')} x "
             f"{plural(p['steps_per_epoch'], 'step')}, {p['trainable']:,} trainable parameters")
        if is_human():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            if self.progress is None:
                # The CLI's own console: a line printed anywhere while the bar is live
                # (info; a warning through _warn) goes above it, never into it.
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn(), console=console)
                self.progress.start()
            total = p["epochs"] * p["steps_per_epoch"]
            done = p["epoch"] * p["steps_per_epoch"] + p["step"]
            self.task_id = self.progress.add_task(f"{self.title}{p['stage']}", total=total,
                                                  completed=done, speed="")

    def on_stage_end(self, p: dict) -> None:
        g = p.get("summary", {}).get("gates")
        if g:
            info(f"{self.title}after stage {p['stage']}: gates {g['state']} (max |gamma| "
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
        info(f"{self.title}epoch {r['epoch']} ({r['stage']}): {metrics}{speed}"
             f"{' *best*' if p['improved'] else ''}")

    def on_machine(self, p: dict) -> None:
        info(f"{self.title}{p['line']}")

    def on_resumed(self, p: dict) -> None:
        info(f"{self.title}resumed at stage {p['stage_index'] + 1}, epoch {p['epoch'] + 1}, step {p['step']}")

    def on_interrupted(self, p: dict) -> None:
        self.close()
        whole = " (the whole comparison)" if "comparison" in p else ""
        warn(f"{self.title}{p.get('signal', 'SIGINT')}: stopped at stage {p['stage']}, epoch {p['epoch'] + 1}, "
             f"step {p['step']}; state saved. Continue with: gct-surgery finetune --resume "
             f"{p.get('comparison', p['run_dir'])}{whole}")

    def on_seed_done(self, p: dict) -> None:
        """A comparison's seed finished: its row, and under --seeds auto the look's verdict."""
        self.title = ""
        arms = ", ".join(f"{arm} {short_number(p[arm]) if p[arm] is not None else '-'}"
                         for arm in ("gct", "control"))
        line = f"seed {p['seed']} done: final {p['metric']} {arms}"
        if p.get("verdict"):
            line += f"; after {plural(p['seeds'], 'seed')}: {p['verdict']}"
        if p.get("reason"):
            line += f" ({p['reason']})"
        info(line)

    def on_arm_done(self, p: dict) -> None:
        info(f"{self.title}finished before; its result is read from {p['run_dir']}/result.json")

    def on_nonfinite_skipped(self, p: dict) -> None:
        self._warn(f"non-finite loss ({p['loss']}) at stage {p['stage']}, epoch {p['epoch'] + 1}, "
                   f"step {p['step']}: batch skipped ({p['skipped']} of {p['allowed']} allowed)")

    def _warn(self, message: str) -> None:
        if self.progress is not None:  # stderr would cut into the live bar: above it instead
            self.progress.console.print(labelled("warning", "yellow", message), soft_wrap=True)
        else:
            warn(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
