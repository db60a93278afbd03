"""One epoch: train it (``train_one_epoch``), then validate, record its row and write
last/best/metrics and the train state (``end_epoch``). Row 0 (``epoch_zero``) measures
the model as it came, before any training."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UserError
from ..io.checkpoint import save
from . import distributed
from .distributed import autocast, batch_size_of, to_device
from .evaluate import evaluate
from .faults import fault_point, nonfinite_loss, stop_run, writing
from .outputs import RunDir, write_metrics, write_per_image
from .state import Run, refuse_nonfinite_weights, write_state
from .stages import Stage, regularizer_for, set_train_mode


def train_one_epoch(run: Run, stage: Stage, train_model: nn.Module, loader, optimizer,
                    scheduler, scaler, steps_per_epoch: int) -> None:
    from .data import start_epoch

    cfg, device, progress = run.config, run.device, run.progress
    epoch_index = sum(s.epochs for s in run.recipe.stages[:progress.stage_index]) + progress.epoch
    start_epoch(loader, epoch_index, skip_batches=progress.step_in_epoch)
    set_train_mode(run.model, stage)
    mix = regularizer_for(stage, run.task, run.model, run.per_rank_batch * stage.grad_accum)
    t0 = time.perf_counter()
    for x, y in loader:  # one batch of grad_accum micro-batches: one optimizer step
        x, y = to_device(x, device), to_device(y, device)
        n = batch_size_of(run.task, y)
        optimizer.zero_grad(set_to_none=True)
        loss_value, skip = _train_step(run, stage, train_model, *mix(x, y),
                                       run.task.loss, optimizer, scaler)
        if skip:  # no update from this batch; raises once the allowance is spent
            nonfinite_loss(run, stage, loss_value, steps_per_epoch)
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
            write_state(run, optimizer, scheduler, scaler)
            saved = True
        fault_point("after_step")
        if distributed.broadcast_flag(run.stop.requested):
            progress.epoch_sums.seconds += time.perf_counter() - t0
            if not saved:
                write_state(run, optimizer, scheduler, scaler)
            stop_run(run, stage)
    progress.epoch_sums.seconds += time.perf_counter() - t0


def _train_step(run: Run, stage: Stage, train_model: nn.Module, x: torch.Tensor, y, loss_fn,
                optimizer, scaler) -> tuple[float, bool]:
    """Forward and backward of the batch in ``grad_accum`` micro-batches, each loss
    divided by their count so the gradient is the whole batch's (DDP syncs gradients on
    the last one only), then the update unless the loss is non-finite on any rank.
    Returns the batch's loss and whether the update was skipped."""
    if run.config.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    parts = stage.grad_accum
    total = torch.zeros((), device=x.device)
    for i, (xi, yi) in enumerate(zip(torch.tensor_split(x, parts), _split(y, parts))):
        last = i == parts - 1
        quiet = not last and hasattr(train_model, "no_sync")
        with train_model.no_sync() if quiet else contextlib.nullcontext():
            with autocast(run.device, run.config.amp), _one_value_per_channel(run, xi):
                loss = loss_fn(train_model(xi), yi) / parts
            total += loss.detach().float()
            if not last:
                _backward(loss, optimizer, scaler)
    loss_value = total.item()  # the step's one host sync, before the last backward
    skip = distributed.broadcast_flag(not math.isfinite(loss_value))
    _backward(loss, optimizer, scaler, stage.clip_grad, step=not skip)
    return loss_value, skip


@contextlib.contextmanager
def _one_value_per_channel(run: Run, x: torch.Tensor):
    """torch's BatchNorm refuses to train on one value per channel: a batch of one image
    after a global pooling (DeepLabV3's ASPP pooling branch). One line, with the fix."""
    try:
        yield
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
        least = 2 * run.dist.world_size  # a micro-batch is --batch-size / processes
        raise UserError(f"a BatchNorm layer cannot train on a batch of {len(x)} image(s) per "
                        f"process after a global pooling ({str(e).split(', got')[0]}); give "
                        f"--batch-size {least} or more") from None


def _backward(loss: torch.Tensor, optimizer, scaler, clip: float | None = None,
              step: bool = False) -> None:
    """Backward, then with ``step`` the gradient clip (timm's ``dispatch_clip_grad``) and
    the update. Under fp16 timm's ``NativeScaler`` scales the loss and unscales the
    gradients before the clip, so the norm is the true one."""
    from timm.utils import dispatch_clip_grad

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler(loss, optimizer, clip_grad=clip, parameters=params, need_update=step)
        return
    loss.backward()
    if step:
        if clip is not None:
            dispatch_clip_grad(params, clip, mode="norm")
        optimizer.step()


def _split(y, parts: int) -> list:
    """Targets cut like the inputs: tensors, or tensors nested in lists, tuples, dicts."""
    if parts == 1:  # a task's targets may hold anything (file names, ids)
        return [y]
    leaves, spec = tree_flatten(y)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UserError("--grad-accum cannot split targets that are not tensors; run without it")
    cuts = [torch.tensor_split(t, parts) for t in leaves]
    return [tree_unflatten([cut[i] for cut in cuts], spec) for i in range(parts)]


def epoch_zero(run: Run) -> None:
    """Row 0: the model as it came, before any training, so every later row (and the
    control's) reads against it."""
    metrics = _validate(run, run.model)
    run.progress.val_samples = int(metrics["samples"])
    row = _row(run, 0, "start", metrics, train_loss=float("nan"), lrs=(float("nan"),) * 2,
               seconds=0.0, images=0)
    run.progress.add_row(row, run.task.primary_metric, run.task.higher_is_better, eligible=False)
    if run.dist.is_main:
        with writing(run.run_dir / RunDir.metrics(run.config.metrics_format), run.resume_hint):
            write_metrics(run.run_dir, run.progress.rows, run.config.metrics_format)
    run.emit("epoch_end", row=row, improved=False)


def _validate(run: Run, model: nn.Module, per_image: bool = False) -> dict:
    return evaluate(model, run.val_set, run.task, run.device, amp=run.config.amp,
                    batch_size=run.per_rank_batch, workers=run.machine.workers, ctx=run.dist,
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
    return (next((lrs[k] for k in ("gate_beta", "gate_alpha_gamma", "head_decay", "head_no_decay")
                  if k in lrs), float("nan")),
            lrs.get("base_decay", lrs.get("base_no_decay", float("nan"))))


def end_epoch(run: Run, stage: Stage, optimizer, scheduler, scaler) -> None:
    """Validate, record the row, write last/best/metrics, then the train state.
    The run's final epoch also keeps the task's per-image results (``per_image.safetensors``,
    what ``--baseline``'s verdict pairs image by image)."""
    progress = run.progress
    final = (progress.stage_index == len(run.recipe.stages) - 1
             and progress.epoch == stage.epochs - 1)
    refuse_nonfinite_weights(run)
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
        files = [(RunDir.LAST, run.model)]
        if run.ema is not None:  # the average that was validated, beside the raw weights
            files.append((RunDir.EMA, eval_model))
        if improved:
            files.append((RunDir.BEST, eval_model))
        # each write names its own file (io/atomic.py); ``writing`` adds how to go on
        with writing(run.run_dir, run.resume_hint):
            for name, model in files:
                save(model, run.run_dir / name, meta)
            write_metrics(run.run_dir, progress.rows, run.config.metrics_format)
            if "per_image" in metrics:
                write_per_image(run.run_dir, metrics["per_image"], run.task.primary_metric)
    write_state(run, optimizer, scheduler, scaler)
    run.emit("epoch_end", row=row, improved=improved)
    if distributed.broadcast_flag(run.stop.requested):
        stop_run(run, stage)  # a signal during validation or the saves: the state is on disk
