"""Staged fine-tuning: the training loop itself, read top to bottom.

``finetune(checkpoint, recipe, config)`` (or ``resume(run_dir)``) sets the run up in
``run_recipe``, then runs the recipe's stages in order. ``run_stage`` freezes what the
stage must (``stages.freeze_for_stage``), builds a *new* optimizer and scheduler
(timm's ``create_optimizer_v2`` / ``create_scheduler_v2``, warm-up then cosine, stepped
per update) and trains epoch by epoch: ``train_one_epoch``, then ``end_epoch``, which
validates and, on rank 0, writes a row of ``metrics.csv``, ``last.safetensors``,
``best.safetensors`` when the primary metric improved, and the train state.

The train state (``state.py``) is also written every ``save_every`` steps and on
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

import copy
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable

import torch
from timm.utils import NativeScaler, random_seed
from torch import nn

from ..core.gate import set_gate_impl
from ..core.model import model_num_classes, replace_head
from ..errors import UserError
from ..io import atomic
from ..io.checkpoint import rebuild
from ..io.metadata import CheckpointMeta
from ..io.state_dicts import freeze_norms_saved_frozen, load_weights, refuse_nonfinite
from ..io.trust import remember, require
from . import distributed
from .config import RunResult, TrainConfig, ema_decay_for, resume_overrides
from .data import DataReport
from .epoch import end_epoch, epoch_zero, train_one_epoch
from .faults import Interrupted, RunError, StopFlag, fault_point, install_fault
from .outputs import RunDir, hold, new_run, run_record, write_plot, write_run_json
from .recipe import Recipe
from .state import (Event, Progress, Run, check_world, count_steps, data_record, extend_run,
                    note_position, read_state, recorded_run, refuse_fixed, set_rng_state)
from .stages import (Stage, freeze_for_stage, hold_gamma, make_optimizer, make_scheduler,
                     trained_words)
from .task import load_task

_logger = logging.getLogger(__name__)

def log_event(kind: str, info: dict) -> None:
    _logger.info("%s %s", kind, info)


def load_for_training(checkpoint: str | Path):
    """``load_checkpoint``, refusing a file with NaN or inf weights by name: a run from
    it would fail at its first step, blaming the learning rate."""
    from ..io.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    refuse_nonfinite(loaded.model, checkpoint, "fine-tuned")
    return loaded


def with_drop_path(model: nn.Module, meta: CheckpointMeta,
                   rate: float) -> tuple[nn.Module, CheckpointMeta]:
    """The model rebuilt by timm with ``drop_path_rate=rate``, holding the same weights,
    and the record that says so (a timm model built without it has no DropPath to turn
    on). The source's kwargs carry the rate, so a resume or a reload rebuilds the same."""
    spec = str(meta.source.get("spec", ""))
    if not spec.startswith("timm:"):
        raise UserError(f"--drop-path needs a timm model (it is set when timm builds one), and "
                        f"this checkpoint's model comes from {spec or 'an unrecorded source'}; "
                        "run without --drop-path")
    meta = with_kwarg(meta, "drop_path_rate", rate)
    rebuilt = rebuild(meta)
    load_weights(rebuilt, model.state_dict(), what="the model", allow_missing_gates=False)
    return rebuilt, meta.with_event("drop_path", rate=rate)


def finetune(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
             on_event: Event | None = None) -> RunResult:
    """Fine-tune a gct-surgery checkpoint through every stage of ``recipe``."""
    remember(config.task)  # a task the caller chose; a resume's recorded one asks first
    with new_run(config.out):  # one process per run folder, for the whole run
        loaded = load_for_training(checkpoint)
        return run_recipe(loaded.model, loaded.meta, recipe, config, on_event or log_event,
                          state=None, source=str(checkpoint))


def resume(run_dir: str | Path, *, on_event: Event | None = None,
           data: str | None = None, strict: bool | None = None,
           skip_nonfinite: int | None = None, epochs: int | None = None,
           fixed: Iterable[str] = ()) -> RunResult:
    """Continue an interrupted (or extend a finished) run from its train state, with its
    own recipe and config. ``data``, ``strict`` and ``skip_nonfinite`` may be changed;
    ``epochs`` extends the stages not yet finished (``state.extend_run``). ``fixed``:
    options the caller was given that the run's record fixes, refused by name."""
    run_dir = Path(run_dir)
    refuse_fixed(fixed, f"the run in {run_dir}")
    overrides = resume_overrides(data=data, strict=strict, skip_nonfinite=skip_nonfinite)
    with hold(run_dir, create=False):  # a live run of this folder is never touched
        state = read_state(run_dir)
        meta = CheckpointMeta.from_json(state["meta"], RunDir(run_dir).state)
        if epochs is not None:
            extended = extend_run(run_dir, state, epochs)
            meta = meta.with_event("extend", epochs=epochs, recipe=extended.to_dict())
        config, recipe, source = recorded_run(run_dir, state, **overrides)
        require(config.task, named_by=str(RunDir(run_dir).state), what="a task")
        model = rebuild(meta, named_by=str(run_dir))
        freeze_norms_saved_frozen(model, state["model"])  # as the run's model had them
        return run_recipe(model, meta, recipe, config, on_event or log_event, state=state,
                          source=source)


def run_recipe(model: nn.Module, meta: CheckpointMeta, recipe: Recipe, config: TrainConfig,
             on_event: Event, *, state: dict | None, source: str) -> RunResult:
    """Set the run up (data, head, device, EMA; or the saved state), run every stage
    left, and write the plot. The process group joined here stays up after the run (a
    ``--baseline`` run follows): the caller ends it with ``distributed.cleanup()``."""
    started = time.perf_counter()
    device = distributed.device_for(config.device)
    ctx = distributed.init(device)
    chosen = distributed.choose(device.type, threads=config.threads, workers=config.workers)
    torch.set_num_threads(chosen.threads)
    if ctx.is_main:
        on_event("machine", {"line": chosen.line(), **chosen.to_dict()})
    if config.batch_size % ctx.world_size:
        raise UserError(f"--batch-size {config.batch_size} (global) must divide evenly "
                        f"among {ctx.world_size} processes")
    install_fault()
    random_seed(config.seed)
    task = load_task(config.task, config)

    # Data: the checkpoint's input size and normalisation, through timm.
    from .data import resolve_data_config

    data_cfg = resolve_data_config(meta.data, model, img_size=config.img_size)
    train_set, val_set = task.datasets(Path(config.data), data_cfg, augment=config.augment)
    check_world(state, meta, config, task, (train_set, val_set), ctx.world_size)

    # Model: a new head when the data has another class count, seeded. A new head
    # is random: gates stages then train it too.
    if state is None:
        if config.drop_path:  # stochastic depth exists only if timm builds the model with it
            model, meta = with_drop_path(model, meta, config.drop_path)
        replaced = _adapt_head(model, meta, config)
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
    if config.arm != "gct":  # a comparison's control: its gates (if any) are static scales
        hold_gamma(model)
    set_gate_impl(model, config.impl)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    run = Run(config, recipe, Path(config.out), model, meta, task, train_set, val_set,
              device, ctx, on_event, stop=StopFlag(Path(config.out)), machine=chosen,
              record=state["run"] if state is not None else run_record(
                  source=source, config=config, recipe=recipe, world_size=ctx.world_size,
                  data=data_record(task, train_set, val_set, config, ctx.world_size),
                  machine=chosen.to_dict()))
    if ctx.is_main:  # a copy for people; a resume writes it again (an extension changed it)
        write_run_json(run.run_dir, run.record)
    run.progress.data_report = DataReport()  # what the folders held besides good images
    for ds in (train_set, val_set):  # (none for a --task's own datasets)
        if isinstance(getattr(ds, "report", None), DataReport):
            run.progress.data_report.merge(ds.report)
    if config.strict:
        from .data import check_strict

        check_strict(run.progress.data_report)
    if config.ema:  # one clock over every stage, warmed up, a window that suits the run
        from timm.utils import ModelEmaV3

        total = sum(_steps_per_epoch(run, s) * s.epochs for s in recipe.stages)
        run.ema = ModelEmaV3(model, decay=ema_decay_for(config, total), use_warmup=True,
                             warmup_power=0.75)
    if state is not None:
        _restore(run, state)
        # A process killed mid-write leaves its temp file; the output itself is intact.
        for path in atomic.remove_stale_temps(run.run_dir) if ctx.is_main else ():
            _logger.info("removed %s, left by an interrupted write", path)
    else:
        epoch_zero(run)

    with run.stop:
        try:
            while run.progress.stage_index < len(recipe.stages):
                run_stage(run, recipe.stages[run.progress.stage_index])
                if run.progress.stage_index < len(recipe.stages):
                    fault_point("between_stages", run.progress.stage_index)
        except Interrupted:
            _write_plot(run)
            raise
    _write_plot(run)
    distributed.barrier()  # every rank checked the whole split: one report, nothing to merge
    return _result(run, time.perf_counter() - started)


def _adapt_head(model: nn.Module, meta: CheckpointMeta, config: TrainConfig) -> CheckpointMeta:
    n = config.num_classes
    if n is None or n == model_num_classes(model):
        return meta
    torch.manual_seed(config.seed)  # the new head's initialisation is part of the seed
    replace_head(model, n)
    return with_kwarg(meta, "num_classes", n).with_event("replace_head", num_classes=n)


def with_kwarg(meta: CheckpointMeta, key: str, value) -> CheckpointMeta:
    """The record with one more builder argument: a resume or a reload builds the same."""
    source = copy.deepcopy(meta.source)
    source.setdefault("kwargs", {})[key] = value
    return replace(meta, source=source)


def _restore(run: Run, state: dict) -> None:
    """Put the model, EMA, progress and every RNG back as ``state`` saved them; the
    stage's optimizer, scheduler and scaler wait in ``run.resume_from``."""
    try:
        run.model.load_state_dict(state["model"])
        if run.ema is not None and state.get("ema"):
            run.ema.module.load_state_dict(state["ema"])
    except RuntimeError as e:  # torch names each tensor missing, unexpected or misshapen
        found = " ".join(str(e).split("\n", 1)[-1].split())[:300]
        raise RunError(f"{RunDir(run.run_dir).state} does not fit the model ({found}), so the "
                       "run cannot resume from it; start the run again with a new --out") from None
    run.progress = Progress.from_state(state, run.progress.data_report)
    run.resume_from = state
    set_rng_state(state["rng"])
    note_position(run)
    progress = run.progress
    run.emit("resumed", stage_index=progress.stage_index, epoch=progress.epoch,
             step=progress.step_in_epoch)


# --- one stage ----------------------------------------------------------------------

def run_stage(run: Run, stage: Stage) -> None:
    """Freeze for the stage, build a fresh optimizer and scheduler, train its epochs."""
    model, cfg, progress = run.model, run.config, run.progress
    if progress.epoch == 0 and progress.step_in_epoch == 0:
        # Each stage draws its augmentation from its own seed: every arm of a comparison
        # sees the same randomness in every stage.
        random_seed(cfg.seed * 100 + progress.stage_index + 1)
    trainable = freeze_for_stage(model, stage, allow_empty=cfg.arm == "control")
    if trainable == 0:  # an identity control (gates removed) where only gates trained:
        # BatchNorm's affine trains at the base lr instead, so the steps match GCT's.
        stage = replace(stage, train_bn=True, lr=stage.effective_base_lr)
        trainable = freeze_for_stage(model, stage, allow_empty=True)
        if trainable == 0:
            raise UserError(f"the identity control has nothing to train in stage {stage.name!r} "
                            "(no gates, new head or BatchNorm): use --control static")
    progress.trainable_max = max(progress.trainable_max, trainable)
    steps_per_epoch = _steps_per_epoch(run, stage)
    optimizer = make_optimizer(model, stage)
    scheduler = make_scheduler(optimizer, stage, steps_per_epoch)
    scaler = NativeScaler("cuda") if cfg.amp == "fp16" else None  # CPU: no scaler
    if progress.stage_step:  # resumed mid-stage
        saved = run.resume_from
        optimizer.load_state_dict(saved["optimizer"])
        length = getattr(scheduler, "t_initial", None)  # this stage's epochs x updates
        scheduler.load_state_dict(saved["scheduler"])
        if length is not None:  # an extended stage: its cosine stretches, its warm-up stays
            scheduler.t_initial = length
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
    run.resume_from = None  # later stages start afresh
    scheduler.step_update(progress.stage_step)

    train_model = model
    if run.dist.enabled:  # rebuilt per stage: DDP fixes its parameter set at construction
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids)

    from .data import make_loader

    loader = make_loader(run.train_set, run.per_rank_batch * stage.grad_accum, training=True, seed=cfg.seed,
                         workers=run.machine.workers, rank=run.dist.rank, world_size=run.dist.world_size,
                         pin_memory=run.device.type == "cuda")
    run.emit("stage_start", stage=stage.name, kind=stage.kind, epochs=stage.epochs,
             steps_per_epoch=steps_per_epoch, trainable=trainable, epoch=progress.epoch,
             step=progress.step_in_epoch)
    while progress.epoch < stage.epochs:
        train_one_epoch(run, stage, train_model, loader, optimizer, scheduler, scaler, steps_per_epoch)
        end_epoch(run, stage, optimizer, scheduler, scaler)
    _finish_stage(run, stage, trainable)


def _steps_per_epoch(run: Run, stage: Stage) -> int:
    """Optimizer updates per epoch (one per ``grad_accum`` batches)."""
    steps = count_steps(len(run.train_set), run.config.batch_size, run.dist.world_size,
                        stage.grad_accum)
    if steps == 0:
        accum = f" x --grad-accum {stage.grad_accum}" if stage.grad_accum > 1 else ""
        raise UserError(f"the train split has {len(run.train_set)} samples, fewer than one "
                        f"global batch of {run.config.batch_size}{accum} (stage {stage.name!r}); "
                        f"lower --batch-size{' or --grad-accum' if accum else ''}")
    return steps


def _finish_stage(run: Run, stage: Stage, trainable: int) -> None:
    """Record what the stage trained and how far the gates moved (the run reports it),
    and move the run's position on to the next stage."""
    from ..core.fold import gate_movement
    from .verdict import json_safe

    progress = run.progress
    movement = gate_movement(run.model)
    trained = trained_words(run.model, stage, gamma_held=run.config.arm != "gct")
    summary = {"name": stage.name, "kind": stage.kind, "trained": trained,
               "trainable_params": trainable, "steps": progress.stage_step,
               "max_abs_gamma": movement.max_abs_gamma if movement.gates else None}
    if movement.gates:
        summary["gates"] = movement.to_dict()
    progress.stages.append(summary)
    run.meta = run.meta.with_event("finetune", stage=stage.to_dict(), epochs=stage.epochs,
                                   best=json_safe(progress.best),
                                   last=json_safe(progress.rows[-1] if progress.rows else None))
    run.emit("stage_end", stage=stage.name, summary=summary)
    progress.stage_index += 1
    progress.epoch = progress.step_in_epoch = progress.stage_step = 0


# --- the end of a run ---------------------------------------------------------------

def _write_plot(run: Run) -> None:
    if run.dist.is_main:
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
                     val_samples=progress.val_samples, machine=run.machine.to_dict())
