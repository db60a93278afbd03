"""Staged fine-tuning: the training loop itself, read top to bottom.

``finetune(checkpoint, recipe, config)`` (or ``resume(run_dir)``) sets the run up in
``run_recipe``, then runs the recipe's stages in order. ``run_stage`` freezes what the
stage must (``stages.freeze_for_stage``), builds a *new* optimizer and scheduler
(timm's ``create_optimizer_v2`` / ``create_scheduler_v2``, warm-up then cosine, stepped
per update) and trains epoch by epoch: ``train_one_epoch``, then ``end_epoch``, which
validates and, on rank 0, writes a row of ``metrics.csv``, ``last.safetensors``,
``best.safetensors`` when the primary metric improved, and the train state.

The train state (``progress.py``) is also written every ``save_every`` steps and on
Ctrl-C, so ``resume`` continues from the last completed step. The sampler's order
depends only on ``seed + epoch``: a resumed run skips the batches already done and
sees exactly the batches the uninterrupted run would have seen.

Under torchrun the same code runs in every process: DDP (gloo on CPU, nccl on CUDA),
a distributed sampler, metrics summed across ranks, files written by rank 0 only.
``config.batch_size`` is the *global* batch; each rank gets ``batch_size / world``.

Faults: a non-finite loss stops the stage naming the step (``skip_nonfinite`` skips a
few such batches); SIGINT and SIGTERM save a resumable state, then stop (``faults.py``,
docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ..core.gate import set_gate_impl
from ..core.heads import model_num_classes, replace_head
from ..errors import UserError
from ..io.checkpoint import rebuild, save
from ..io.metadata import CheckpointMeta
from . import distributed, lock
from .config import RunResult, TrainConfig, ema_decay_for, resume_overrides
from .device import autocast, batch_size_of, to_device
from .evaluate import evaluate, evaluate_checkpoint  # noqa: F401 (re-exported)
from .faults import (Interrupted, NonFiniteLossError, RunError, StopFlag, WriteError,  # noqa: F401
                     check_fault_spec, fault_hook, nonfinite_loss, nonfinite_weight, stop_run,
                     writing)
from .outputs import read_run_info, remove_stale_temps, write_metrics, write_plot, write_run_info
from .progress import (STATE_FILE, Progress, gather_data_report, read_state, scan_data_report,
                       seed_everything, set_rng_state, write_state)
from .recipe import Recipe
from .run import Event, Run
from .stages import Stage, freeze_for_stage, make_optimizer, make_scheduler, set_train_mode
from .task import Task, load_task
from .world import check_world, count_steps, data_record, load_for_training

_logger = logging.getLogger(__name__)

def log_event(kind: str, info: dict) -> None:
    _logger.info("%s %s", kind, info)


def finetune(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
             on_event: Event | None = None) -> RunResult:
    """Fine-tune a gct-surgery checkpoint through every stage of ``recipe``."""
    with lock.new_run(config.out):  # one process per run folder, for the whole run
        loaded = load_for_training(checkpoint)
        return run_recipe(loaded.model, loaded.meta, recipe, config, on_event or log_event,
                          state=None, source=str(checkpoint))


def resume(run_dir: str | Path, *, on_event: Event | None = None,
           data: str | None = None, strict: bool | None = None,
           skip_nonfinite: int | None = None) -> RunResult:
    """Continue an interrupted run from its train state, with its own recipe and config
    (``data``, ``strict`` and ``skip_nonfinite`` may be changed)."""
    run_dir = Path(run_dir)
    overrides = resume_overrides(data=data, strict=strict, skip_nonfinite=skip_nonfinite)
    with lock.hold(run_dir, create=False):  # a live run of this folder is never touched
        state = read_state(run_dir)
        config, recipe, source = read_run_info(run_dir, overrides)
        meta = CheckpointMeta.from_json(state["meta"], run_dir / STATE_FILE)
        return run_recipe(rebuild(meta), meta, recipe, config, on_event or log_event, state=state,
                          source=source)


def run_recipe(model: nn.Module, meta: CheckpointMeta, recipe: Recipe, config: TrainConfig,
             on_event: Event, *, state: dict | None, source: str) -> RunResult:
    """Set the run up (data, head, device, EMA; or the saved state), run every stage
    left, and write the plot. The process group joined here stays up after the run (a
    ``--baseline`` run follows): the caller ends it with ``distributed.cleanup()``."""
    started = time.perf_counter()
    device = distributed.device_for(config.device)
    ctx = distributed.init(device)
    if config.batch_size % ctx.world_size:
        raise UserError(f"--batch-size {config.batch_size} (global) must divide evenly "
                        f"among {ctx.world_size} processes")
    check_fault_spec()
    seed_everything(config.seed)
    task = load_task(config.task)

    # Data: the checkpoint's input size and normalisation, through timm.
    from .loaders import resolve_data_config

    data_cfg = resolve_data_config(meta.data, model, img_size=config.img_size)
    train_set, val_set = task.datasets(Path(config.data), data_cfg, augment=config.augment)
    check_world(state, meta, model, recipe, config, task, (train_set, val_set), ctx.world_size)

    # Model: a new head when the data has another class count, seeded. A new head
    # is random: gates stages then train it too.
    if state is None:
        replaced = _adapt_head(model, meta, config, task)
        if replaced is not meta:
            meta = replaced
            recipe = Recipe(tuple(replace(s, train_head=True) if s.kind == "gates" else s
                                  for s in recipe.stages), recipe.source)
        data = {**meta.data, **data_cfg}
        if getattr(task, "class_names", None):
            data["class_names"] = list(task.class_names)
        meta = replace(meta, data=data)
        meta = meta.with_event("recipe", recipe=recipe.to_dict(), config=asdict(config),
                               checkpoint=source, world_size=ctx.world_size)
    if callable(getattr(task, "check_model", None)):
        task.check_model(model)
    set_gate_impl(model, config.impl)
    model.to(device)

    run = Run(config, recipe, Path(config.out), model, meta, task, train_set, val_set,
              device, ctx, on_event)
    run.progress.data_report = scan_data_report(train_set, val_set)
    if config.strict:
        from .images import check_strict

        check_strict(run.progress.data_report)
    if config.ema:  # one clock over every stage, warmed up, a window that suits the run
        from timm.utils import ModelEmaV3

        total = _steps_per_epoch(run) * sum(s.epochs for s in recipe.stages)
        run.ema = ModelEmaV3(model, decay=ema_decay_for(config, total), use_warmup=True,
                             warmup_power=0.75)
    if state is not None:
        _restore(run, state)
        if ctx.is_main:
            remove_stale_temps(run.run_dir)
    else:
        if ctx.is_main:
            write_run_info(run.run_dir, source=source, config=config, recipe=recipe, world_size=ctx.world_size,
                           data=data_record(task, train_set, val_set, config, ctx.world_size))
        _epoch_zero(run)

    with StopFlag(run.run_dir) as stop:
        run.stop = stop
        try:
            while run.progress.stage_index < len(recipe.stages):
                run_stage(run, recipe.stages[run.progress.stage_index])
                run.progress.finish_stage()
                if run.progress.stage_index < len(recipe.stages):
                    fault_hook("between_stages", run.progress.stage_index)
        except Interrupted:
            _write_plot(run)
            raise
    _write_plot(run)
    distributed.barrier()
    run.progress.data_report = gather_data_report(run.progress.data_report, ctx)
    return _result(run, time.perf_counter() - started)


def _adapt_head(model: nn.Module, meta: CheckpointMeta, config: TrainConfig, task: Task) -> CheckpointMeta:
    n = config.num_classes
    if n is None or n == model_num_classes(model):
        return meta
    torch.manual_seed(config.seed)  # the new head's initialisation is part of the seed
    replace_head(model, n)
    source = copy.deepcopy(meta.source)
    source.setdefault("kwargs", {})["num_classes"] = n
    meta = replace(meta, source=source)
    return meta.with_event("replace_head", num_classes=n)


def _restore(run: Run, state: dict) -> None:
    """Put the model, EMA, progress and every RNG back as ``state`` saved them; the
    stage's optimizer, scheduler and scaler wait in ``run.resume_from``."""
    run.model.load_state_dict(state["model"])
    if run.ema is not None and state.get("ema"):
        run.ema.module.load_state_dict(state["ema"])
    run.progress = Progress.from_state(state, run.progress.data_report)
    run.resume_from = state
    set_rng_state(state["rng"])
    progress = run.progress
    if progress.stage_index >= len(run.recipe.stages):
        run.emit("finished", run_dir=str(run.run_dir))
    run.emit("resumed", stage_index=progress.stage_index, epoch=progress.epoch,
             step=progress.step_in_epoch)


# --- one stage ----------------------------------------------------------------------

def run_stage(run: Run, stage: Stage) -> None:
    """Freeze for the stage, build a fresh optimizer and scheduler, train its epochs."""
    model, cfg, progress = run.model, run.config, run.progress
    if progress.epoch == 0 and progress.step_in_epoch == 0:
        # Each stage draws its augmentation from its own seed, so a stage of a control
        # run that trains nothing leaves the next stage's randomness as GCT's.
        seed_everything(cfg.seed * 100 + progress.stage_index + 1)
    trainable = freeze_for_stage(model, stage, allow_empty=cfg.arm != "gct")
    progress.trainable_max = max(progress.trainable_max, trainable)
    steps_per_epoch = _steps_per_epoch(run)
    if trainable == 0:  # a control's gates stage: nothing can change, the rows repeat
        run.emit("stage_start", stage=stage.name, kind=stage.kind, epochs=stage.epochs,
                 steps_per_epoch=0, trainable=0, epoch=progress.epoch, step=0)
        while progress.epoch < stage.epochs:
            end_epoch(run, stage, None, None, None, unchanged=True)
        _finish_stage(run, stage, trainable)
        return
    optimizer = make_optimizer(model, stage)
    scheduler = make_scheduler(optimizer, stage, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    if progress.stage_step:  # resumed mid-stage
        saved = run.resume_from
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
    run.resume_from = None  # later stages start afresh
    scheduler.step_update(progress.stage_step)

    train_model = model
    if run.dist.enabled:  # rebuilt per stage: DDP fixes its parameter set at construction
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids)

    from .loaders import make_loader

    loader = make_loader(run.train_set, run.per_rank_batch, training=True, seed=cfg.seed,
                         workers=cfg.workers, rank=run.dist.rank, world_size=run.dist.world_size,
                         pin_memory=run.device.type == "cuda", report=progress.data_report,
                         strict=cfg.strict, on_bad=lambda p, r: run.emit("bad_file", path=p, reason=r))
    run.emit("stage_start", stage=stage.name, kind=stage.kind, epochs=stage.epochs,
             steps_per_epoch=steps_per_epoch, trainable=trainable, epoch=progress.epoch,
             step=progress.step_in_epoch)
    from .frozen import frozen_base

    cheap = frozen_base(model) if stage.kind == "gates" and cfg.fast_frozen else contextlib.nullcontext()
    with cheap:  # exact classes back on exit; state dicts unchanged while active
        while progress.epoch < stage.epochs:
            train_one_epoch(run, stage, train_model, loader, optimizer, scheduler, scaler, steps_per_epoch)
            end_epoch(run, stage, optimizer, scheduler, scaler)
    _finish_stage(run, stage, trainable)


def _steps_per_epoch(run: Run) -> int:
    steps = count_steps(len(run.train_set), run.config.batch_size, run.dist.world_size)
    if steps == 0:
        raise UserError(f"the train split has {len(run.train_set)} samples, fewer than one "
                        f"global batch of {run.config.batch_size}; lower --batch-size")
    return steps


def _finish_stage(run: Run, stage: Stage, trainable: int) -> None:
    """Record what the stage trained and how far the gates moved (the run reports it)."""
    from ..core.movement import gate_movement

    progress = run.progress
    summary = {"name": stage.name, "kind": stage.kind, "trainable_params": trainable}
    movement = gate_movement(run.model)
    if movement.gates:
        summary.update(max_abs_gamma=movement.max_abs_gamma, gates=movement.to_dict())
    progress.stages.append(summary)
    run.meta = run.meta.with_event("finetune", stage=stage.to_dict(), epochs=stage.epochs,
                                   best=progress.best, last=progress.rows[-1] if progress.rows else None)
    run.emit("stage_end", stage=stage.name, summary=summary)


# --- one epoch ----------------------------------------------------------------------

def train_one_epoch(run: Run, stage: Stage, train_model: nn.Module, loader, optimizer,
                    scheduler, scaler, steps_per_epoch: int) -> None:
    from .loaders import start_epoch

    cfg, device, progress = run.config, run.device, run.progress
    epoch_index = sum(s.epochs for s in run.recipe.stages[:progress.stage_index]) + progress.epoch
    start_epoch(loader, epoch_index, skip_batches=progress.step_in_epoch)
    set_train_mode(run.model, stage)
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = to_device(x, device), to_device(y, device)
        with autocast(device, cfg.amp):
            loss = run.task.loss(train_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_value = loss.item()  # the step's one host sync, after backward is queued
        skip = distributed.broadcast_flag(not math.isfinite(loss_value))
        if skip:  # no update from this batch; raises once the allowance is spent
            nonfinite_loss(run, stage, loss_value, steps_per_epoch)
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        progress.last_lr, progress.last_base_lr = _lrs(optimizer)  # what this update used
        progress.stage_step += 1
        progress.step_in_epoch += 1
        scheduler.step_update(progress.stage_step)
        n = batch_size_of(run.task, y)
        if not skip:
            progress.global_step += 1
            if run.ema is not None:
                run.ema.update(run.model, step=progress.global_step)
            progress.epoch_sums.loss_sum += loss_value * n
            progress.epoch_sums.samples += n
        run.emit("step", stage=stage.name, epoch=progress.epoch, step=progress.step_in_epoch,
                 steps=steps_per_epoch, loss=loss_value, lr=progress.last_lr, images=n)
        saved = False
        if (cfg.save_every and progress.step_in_epoch % cfg.save_every == 0
                and progress.step_in_epoch < steps_per_epoch):
            progress.epoch_sums.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            save_state(run, optimizer, scheduler, scaler)
            saved = True
        fault_hook("after_step")
        if run.stop is not None and distributed.broadcast_flag(run.stop.requested):
            progress.epoch_sums.seconds += time.perf_counter() - t0
            if not saved:
                save_state(run, optimizer, scheduler, scaler)
            stop_run(run, stage)
    progress.epoch_sums.seconds += time.perf_counter() - t0


def _epoch_zero(run: Run) -> None:
    """Row 0: the model as it came, before any training, so every later row (and the
    control's) reads against it."""
    metrics = _validate(run, run.model)
    run.progress.val_samples = int(metrics["samples"])
    row = _row(run, 0, "start", metrics, train_loss=float("nan"), lrs=(float("nan"),) * 2,
               seconds=0.0, images=0)
    run.progress.add_row(row, run.task.primary_metric, run.task.higher_is_better, eligible=False)
    if run.dist.is_main:
        with writing(run.run_dir / f"metrics.{run.config.metrics_format}", run.resume_hint):
            write_metrics(run.run_dir, run.progress.rows, run.config.metrics_format)
    run.emit("epoch_end", row=row, improved=False)


def _validate(run: Run, model: nn.Module) -> dict:
    return evaluate(model, run.val_set, run.task, run.device, amp=run.config.amp,
                    batch_size=run.per_rank_batch, workers=run.config.workers, ctx=run.dist,
                    report=run.progress.data_report, strict=run.config.strict)


def _row(run: Run, epoch: int, stage: str, metrics: dict, *, train_loss: float,
         lrs: tuple[float, float], seconds: float, images: float) -> dict:
    """One line of metrics.csv. ``lr`` is the stage's own learning rate (the gates', or a
    trained head's), ``base_lr`` the base weights' (nan while they are frozen), so the
    rows of a GCT run and of its control read column by column."""
    return {"epoch": epoch, "stage": stage, "train_loss": train_loss, "val_loss": metrics["loss"],
            **{k: metrics[k] for k in run.task.metric_names}, "lr": lrs[0], "base_lr": lrs[1],
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else float("nan")}


def _lrs(optimizer) -> tuple[float, float]:
    """The stage's and the base weights' learning rates (stages.param_groups names them)."""
    lrs = {g.get("name"): g["lr"] for g in optimizer.param_groups}
    own = next((lrs[k] for k in ("gate_beta", "gate_alpha_gamma", "head_decay", "head_no_decay")
                if k in lrs), float("nan"))
    return own, lrs.get("base_decay", lrs.get("base_no_decay", float("nan")))


def end_epoch(run: Run, stage: Stage, optimizer, scheduler, scaler, *, unchanged: bool = False) -> None:
    """Validate, record the row, write last/best/metrics, then the train state.
    ``unchanged``: nothing trained (a control's gates stage), so the last row's metrics
    still hold and are not measured again."""
    progress = run.progress
    bad = nonfinite_weight(run.model)
    if bad is not None:  # a finite loss whose update overflowed: never save such weights
        raise NonFiniteLossError(
            f"the weights became non-finite in stage {stage.name!r}, epoch {progress.epoch + 1} "
            f"(first: {bad}); nothing of this epoch was written, {run.run_dir} holds the last "
            "good save. Lower the learning rate")
    eval_model = run.ema.module if run.ema is not None else run.model
    if unchanged:
        last = progress.rows[-1]
        metrics = {"loss": last["val_loss"], **{k: last[k] for k in run.task.metric_names}}
    else:
        metrics = _validate(run, eval_model)
    sums = progress.epoch_sums
    loss_sum, n = distributed.all_reduce_sum(
        torch.tensor([sums.loss_sum, sums.samples], dtype=torch.float64)).tolist()
    row = _row(run, progress.rows[-1]["epoch"] + 1, stage.name, metrics,
               train_loss=loss_sum / n if n else float("nan"),
               lrs=(float("nan"),) * 2 if unchanged else (progress.last_lr, progress.last_base_lr),
               seconds=sums.seconds, images=n)
    improved = progress.add_row(row, run.task.primary_metric, run.task.higher_is_better)
    progress.finish_epoch()
    if run.dist.is_main:
        meta = run.meta.with_event("finetune", stage=stage.to_dict(), epochs_completed=progress.epoch,
                                   metrics=row)
        hint = run.resume_hint
        files = [("last.safetensors", run.model)]
        if run.ema is not None:  # the average that was validated, beside the raw weights
            files.append(("ema.safetensors", eval_model))
        if improved:
            files.append(("best.safetensors", eval_model))
        for name, model in files:
            with writing(run.run_dir / name, hint):
                save(model, run.run_dir / name, meta)
        with writing(run.run_dir / f"metrics.{run.config.metrics_format}", hint):
            write_metrics(run.run_dir, progress.rows, run.config.metrics_format)
    save_state(run, optimizer, scheduler, scaler)
    run.emit("epoch_end", row=row, improved=improved)
    if run.stop is not None and distributed.broadcast_flag(run.stop.requested):
        stop_run(run, stage)  # a signal during validation or the saves: the state is on disk


def save_state(run: Run, optimizer, scheduler, scaler) -> None:
    """The train state (``progress.write_state``), rank 0 only."""
    if run.dist.is_main:
        write_state(run.run_dir, run.progress, run.recipe.stages[run.progress.stage_index].name,
                    meta_json=run.meta.to_json(), model=run.model, optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler,
                    ema_model=run.ema.module if run.ema is not None else None, hint=run.resume_hint)


# --- the end of a run ---------------------------------------------------------------

def _write_plot(run: Run) -> None:
    if run.dist.is_main:
        with writing(run.run_dir / "metrics.png"):
            write_plot(run.run_dir, run.progress.rows, run.task.primary_metric)


def _result(run: Run, seconds: float) -> RunResult:
    from ..core.surgery import base_parameter_count

    progress = run.progress
    total = sum(p.numel() for p in run.model.parameters())
    report = progress.data_report
    return RunResult(run.run_dir, progress.rows, progress.best, seconds, total,
                     total - base_parameter_count(run.model), progress.trainable_max,
                     data=report.to_dict() if report is not None else {},
                     nonfinite_skipped=progress.nonfinite_skipped,
                     metric_names=tuple(run.task.metric_names),
                     primary_metric=run.task.primary_metric,
                     higher_is_better=bool(run.task.higher_is_better), stages=progress.stages,
                     val_samples=progress.val_samples)
