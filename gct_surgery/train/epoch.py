"""One epoch: train it (``train_one_epoch``), then validate, record its row and write
last/best/metrics and the train state (``end_epoch``). Row 0 (``epoch_zero``) measures
the model as it came, before any training."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn

from ..errors import UserError
from ..io.checkpoint import save
from . import distributed
from .device import autocast, batch_size_of, to_device
from .evaluate import evaluate
from .faults import NonFiniteLossError, fault_hook, nonfinite_loss, nonfinite_weight, stop_run, writing
from .outputs import PER_IMAGE, write_metrics, write_per_image
from .progress import write_state
from .regularize import regularizer_for
from .run import Run
from .stages import Stage, set_train_mode


def train_one_epoch(run: Run, stage: Stage, train_model: nn.Module, loader, optimizer,
                    scheduler, scaler, steps_per_epoch: int) -> None:
    from .loaders import start_epoch

    cfg, device, progress = run.config, run.device, run.progress
    epoch_index = sum(s.epochs for s in run.recipe.stages[:progress.stage_index]) + progress.epoch
    start_epoch(loader, epoch_index, skip_batches=progress.step_in_epoch)
    set_train_mode(run.model, stage)
    regularizer = regularizer_for(stage, run.task, run.model, run.per_rank_batch * stage.grad_accum)
    t0 = time.perf_counter()
    for x, y in loader:  # one batch of grad_accum micro-batches: one optimizer step
        x, y = to_device(x, device), to_device(y, device)
        n = batch_size_of(run.task, y)
        optimizer.zero_grad(set_to_none=True)
        loss = _forward_backward(run, stage, train_model, *regularizer(x, y), regularizer.loss, scaler)
        loss_value = loss.item()  # the step's one host sync, after backward is queued
        skip = distributed.broadcast_flag(not math.isfinite(loss_value))
        if skip:  # no update from this batch; raises once the allowance is spent
            nonfinite_loss(run, stage, loss_value, steps_per_epoch)
        else:
            if stage.clip_grad is not None:
                _clip_gradients(optimizer, scaler, stage.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        progress.last_lr, progress.last_base_lr = _lrs(optimizer)  # what this update used
        progress.stage_step += 1
        progress.step_in_epoch += 1
        scheduler.step_update(progress.stage_step)
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


def _forward_backward(run: Run, stage: Stage, train_model: nn.Module, x: torch.Tensor, y,
                      loss_fn, scaler) -> torch.Tensor:
    """Forward and backward of the batch in ``grad_accum`` micro-batches, each loss
    divided by their count so the gradient is the whole batch's; DDP syncs gradients
    on the last one only. Returns the batch's loss (detached)."""
    if run.config.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    parts = stage.grad_accum
    xs, ys = torch.tensor_split(x, parts), _split(y, parts)
    total = torch.zeros((), device=x.device)
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        quiet = i < parts - 1 and hasattr(train_model, "no_sync")
        with train_model.no_sync() if quiet else contextlib.nullcontext():
            with autocast(run.device, run.config.amp):
                loss = loss_fn(train_model(xi), yi) / parts
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total


def _split(y, parts: int) -> list:
    """Targets cut like the inputs: tensors, or tensors nested in lists, tuples, dicts."""
    if parts == 1:
        return [y]
    if isinstance(y, torch.Tensor):
        return list(torch.tensor_split(y, parts))
    if isinstance(y, (list, tuple)):
        return [type(y)(v) for v in zip(*(_split(v, parts) for v in y))]
    if isinstance(y, dict):
        cut = {k: _split(v, parts) for k, v in y.items()}
        return [{k: cut[k][i] for k in y} for i in range(parts)]
    raise UserError(f"--grad-accum cannot split targets of type {type(y).__name__}; run without it")


def _clip_gradients(optimizer, scaler, max_norm: float) -> None:
    """timm's ``dispatch_clip_grad`` on the trained parameters; fp16 gradients are
    unscaled first, so the norm is the true one."""
    from timm.utils import dispatch_clip_grad

    if scaler is not None:
        scaler.unscale_(optimizer)
    dispatch_clip_grad([p for g in optimizer.param_groups for p in g["params"]], max_norm, mode="norm")


def epoch_zero(run: Run) -> None:
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


def _validate(run: Run, model: nn.Module, per_image: bool = False) -> dict:
    return evaluate(model, run.val_set, run.task, run.device, amp=run.config.amp,
                    batch_size=run.per_rank_batch, workers=run.machine.workers, ctx=run.dist,
                    report=run.progress.data_report, strict=run.config.strict,
                    per_image=per_image)


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


def end_epoch(run: Run, stage: Stage, optimizer, scheduler, scaler) -> None:
    """Validate, record the row, write last/best/metrics, then the train state.
    The run's final epoch also keeps the task's per-image results (``per_image.safetensors``,
    what ``--baseline``'s verdict pairs image by image)."""
    progress = run.progress
    final = (progress.stage_index == len(run.recipe.stages) - 1
             and progress.epoch == stage.epochs - 1)
    bad = nonfinite_weight(run.model)
    if bad is not None:  # a finite loss whose update overflowed: never save such weights
        raise NonFiniteLossError(
            f"the weights became non-finite in stage {stage.name!r}, epoch {progress.epoch + 1} "
            f"(first: {bad}); nothing of this epoch was written, {run.run_dir} holds the last "
            "good save. Lower the learning rate")
    eval_model = run.ema.module if run.ema is not None else run.model
    metrics = _validate(run, eval_model, per_image=final)
    sums = progress.epoch_sums
    loss_sum, n = distributed.all_reduce_sum(
        torch.tensor([sums.loss_sum, sums.samples], dtype=torch.float64)).tolist()
    row = _row(run, progress.rows[-1]["epoch"] + 1, stage.name, metrics,
               train_loss=loss_sum / n if n else float("nan"),
               lrs=(progress.last_lr, progress.last_base_lr),
               seconds=sums.seconds, images=n)
    improved = progress.add_row(row, run.task.primary_metric, run.task.higher_is_better)
    progress.finish_epoch()
    if run.dist.is_main:
        from .verdict import json_safe

        meta = run.meta.with_event("finetune", stage=stage.to_dict(), epochs_completed=progress.epoch,
                                   metrics=json_safe(row))
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
        if "per_image" in metrics:
            with writing(run.run_dir / PER_IMAGE, hint):
                write_per_image(run.run_dir, metrics["per_image"], run.task.primary_metric)
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
