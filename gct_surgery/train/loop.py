"""Staged fine-tuning: the training loop, nanoGPT-style, top to bottom.

``finetune(checkpoint, recipe, config)`` runs the recipe's stages in order. Each stage
freezes what it must (``stages.freeze_for_stage``), gets a *new* optimizer and
scheduler (timm's ``create_optimizer_v2`` / ``create_scheduler_v2``, warm-up then
cosine, stepped per update), and trains epoch by epoch. After every epoch, on rank 0:
a row in ``metrics.csv``, ``last.safetensors``, ``best.safetensors`` when the primary
metric improved, and the train state ``state.pt``.

The train state (model, optimizer, scheduler, EMA, every RNG, stage, epoch, step) is
a plain dict of tensors and numbers, written atomically and read with
``weights_only=True``. It is also written every ``save_every`` steps and on Ctrl-C, so
``resume(run_dir)`` continues from the last completed step. The sampler's order
depends only on ``seed + epoch``: a resumed run skips the batches already done and
sees exactly the batches the uninterrupted run would have seen.

Under torchrun the same code runs in every process: DDP (gloo on CPU, nccl on CUDA),
a distributed sampler, metrics summed across ranks, files written by rank 0 only.
``config.batch_size`` is the *global* batch; each rank gets ``batch_size / world``.

Faults (docs/reliability.md): a non-finite loss stops the stage with an error naming
the step (``skip_nonfinite`` tolerates a few such batches); SIGINT and SIGTERM save a
resumable state, then stop; a failed write (disk full) is one clear error and keeps
the previous files; bad image files are skipped and counted (``data.DataReport``), or
stop the run under ``strict``. ``GCT_SURGERY_FAULT`` is a testing hook that makes the
process signal itself at a chosen point.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from ..io.atomic import atomic_path, atomic_write_text
from ..io.checkpoint import CheckpointMeta, load_checkpoint, rebuild, save
from ..errors import UserError
from ..core.gate import set_gate_impl
from .recipe import Recipe, recipe_from_dict
from .stages import Stage, freeze_for_stage, make_optimizer, replace_head, set_train_mode
from .device import autocast, batch_size_of, to_device
from .evaluate import EvalResult, evaluate, evaluate_checkpoint  # noqa: F401 (re-exported)
from .task import Task, load_task

_logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_VERSION = 1
AMP_MODES = ("off", "bf16", "fp16")

Event = Callable[[str, dict], None]


class RunError(UserError):
    """A run folder cannot be started or resumed."""


@dataclass
class TrainConfig:
    """Hyperparameters shared by every stage (the stages carry their own lr, wd...)."""

    data: str
    out: str
    batch_size: int = 32            # global, over all ranks
    workers: int = 2
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    amp: str = "off"                # off | bf16 (CPU or CUDA) | fp16 (CUDA)
    num_classes: int | None = None  # replace the head for a data set with another class count
    img_size: int | None = None     # override the checkpoint's input size (square)
    augment: bool = True            # timm's train augmentation (False: resize + center crop)
    ema: bool = False               # ModelEmaV3; validation and best.safetensors use it
    ema_decay: float = 0.9998
    save_every: int = 0             # also write the train state every N steps (0: per epoch)
    task: str | None = None         # module:object, see task.py; None = classification
    metrics_format: str = "csv"     # csv | jsonl
    strict: bool = False            # stop at the first unreadable image instead of skipping it
    skip_nonfinite: int = 0         # batches with a NaN/inf loss to skip before stopping
    fast_frozen: bool = True        # gates stages: frozen.frozen_base (cheap frozen convs, BN folded)
    impl: str = "fast"              # gate implementation: fast (fused) or reference (official ops)

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise UserError(f"--amp {self.amp!r}: choose one of {', '.join(AMP_MODES)}")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.metrics_format not in ("csv", "jsonl"):
            raise UserError("metrics format is csv or jsonl")
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError("--num-classes must be at least 1")
        if self.skip_nonfinite < 0:
            raise UserError("--skip-nonfinite must be 0 or more")


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict]
    best: dict | None
    seconds: float
    params: int
    gate_params: int
    trainable_params: int  # the most any stage trained
    interrupted: bool = False
    data: dict = field(default_factory=dict)  # data.DataReport.to_dict(): bad files skipped...
    nonfinite_skipped: int = 0                # batches skipped for a non-finite loss

    @property
    def last(self) -> dict | None:
        return self.rows[-1] if self.rows else None

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "best": self.best, "last": self.last,
                "seconds": round(self.seconds, 3), "params": self.params,
                "gate_params": self.gate_params, "trainable_params": self.trainable_params,
                "epochs": len(self.rows), "interrupted": self.interrupted, "data": self.data,
                "nonfinite_skipped": self.nonfinite_skipped}


# --- setup helpers ------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG as plain types and tensors (loadable with weights_only=True)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_scheduler(optimizer, stage: Stage, steps_per_epoch: int):
    """timm's scheduler stepped per update: linear warm-up, then cosine (by default)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=stage.sched, num_epochs=stage.epochs,
        warmup_epochs=stage.warmup * stage.epochs, warmup_lr=1e-6 if stage.warmup else 0.0,
        min_lr=stage.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and preemption


class StopFlag:
    """Ctrl-C (SIGINT) or preemption (SIGTERM) sets a flag; the loop saves a resumable
    state at the end of the current step (or epoch) and stops. A second signal
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Interrupted(KeyboardInterrupt):
    """Raised after Ctrl-C or SIGTERM once the resumable state is on disk."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN or infinite; nothing non-finite was saved."""


class WriteError(UserError):
    """An output could not be written (disk full, file too large, no permission)."""


# --- testing hook -------------------------------------------------------------------

FAULT_ENV = "GCT_SURGERY_FAULT"
_FAULT_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


def _fault(point: str, count: int) -> None:
    """Testing hook: ``GCT_SURGERY_FAULT=ACTION:POINT:N`` makes this process send itself
    SIGKILL (``kill``), SIGTERM (``term``) or SIGINT (``int``) at a chosen point:
    ``after_step:N`` (after its N-th training step) or ``between_stages:N`` (after
    stage N, before the next). ``kill:during_save:FILE[:N]`` lives in ``atomic.py``.
    Unset (always, outside tests) it costs one dictionary lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, rest = spec.partition(":")
    where, _, n = rest.partition(":")
    if where == point and action in _FAULT_SIGNALS and n.isdigit() and int(n) == count:
        os.kill(os.getpid(), _FAULT_SIGNALS[action])


def _check_fault_spec() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, rest = spec.partition(":")
    where, _, n = rest.partition(":")
    ok = action in _FAULT_SIGNALS and (
        (where in ("after_step", "between_stages") and n.isdigit())
        or (where == "during_save" and action == "kill" and n))
    if not ok:
        raise RunError(f"{FAULT_ENV}={spec!r} is not a fault this tool knows: use "
                       "kill|term|int:after_step:N, kill|term|int:between_stages:N or "
                       "kill:during_save:FILE[:N] (a testing hook; unset it to train)")


# --- writing outputs ----------------------------------------------------------------

@contextlib.contextmanager
def writing(path: Path, hint: str = ""):
    """Turn a failed write (disk full, file too large...) into one clear error. The
    write itself goes through ``atomic_path``, so the previous file is untouched."""
    try:
        yield
    except OSError as e:
        raise _write_error(path, e.strerror or str(e), hint) from None
    except Exception as e:  # safetensors reports I/O errors as its own SafetensorError
        if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):
            reason = str(e).split("I/O error:", 1)[1].split("(os error")[0].strip()
            raise _write_error(path, reason, hint) from None
        raise


def _write_error(path: Path, reason: str, hint: str) -> WriteError:
    return WriteError(f"could not write {path}: {reason}. The previous {Path(path).name}, if "
                      f"any, is unchanged{hint}")


# --- the run ------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one run holds; passed to the stage and epoch functions."""

    config: TrainConfig
    recipe: Recipe
    run_dir: Path
    model: nn.Module
    meta: CheckpointMeta
    task: Task
    train_set: Any
    val_set: Any
    device: torch.device
    dist: distributed.Dist
    on_event: Event
    ema: Any = None
    rows: list[dict] = field(default_factory=list)
    best: dict | None = None
    stage_index: int = 0
    epoch: int = 0                 # within the stage: the epoch in progress
    step_in_epoch: int = 0         # completed steps of that epoch
    stage_step: int = 0            # completed updates in the stage (the scheduler's clock)
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, n, seconds
    trainable_max: int = 0
    last_lr: float = float("nan")  # gate lr of the latest update (group 0)
    stop: StopFlag | None = None
    data_report: Any = None        # data.DataReport: bad files skipped, files ignored
    nonfinite_skipped: int = 0     # batches skipped for a non-finite loss (whole run)
    process_steps: int = 0         # steps this process ran (the fault hook counts them)

    @property
    def resume_hint(self) -> str:
        if (self.run_dir / STATE_FILE).is_file():
            return f"; fix the cause and continue with: gct-surgery finetune --resume {self.run_dir}"
        return "; fix the cause and start the run again"

    @property
    def per_rank_batch(self) -> int:
        return self.config.batch_size // self.dist.world_size

    def emit(self, event: str, **info: Any) -> None:
        if self.dist.is_main:
            self.on_event(event, info)


def _quiet(kind: str, info: dict) -> None:
    _logger.info("%s %s", kind, info)


def finetune(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
             on_event: Event | None = None) -> RunResult:
    """Fine-tune a gct-surgery checkpoint through every stage of ``recipe``."""
    run_dir = Path(config.out)
    if (run_dir / STATE_FILE).exists():
        raise RunError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                       "or choose another --out")
    loaded = load_checkpoint(checkpoint)
    return _execute(loaded.model, loaded.meta, recipe, config, on_event or _quiet,
                    state=None, source=str(checkpoint))


def resume(run_dir: str | Path, *, on_event: Event | None = None,
           data: str | None = None, strict: bool | None = None,
           skip_nonfinite: int | None = None) -> RunResult:
    """Continue an interrupted run from its train state, with its own recipe and config
    (``data``, ``strict`` and ``skip_nonfinite`` may be changed)."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    run_info = json.loads((run_dir / "run.json").read_text())
    overrides = {k: v for k, v in (("data", data), ("strict", strict),
                                   ("skip_nonfinite", skip_nonfinite)) if v is not None}
    config = TrainConfig(**{**run_info["config"], **overrides, "out": str(run_dir)})
    recipe = recipe_from_dict(run_info["recipe"], source=run_info["recipe"].get("source", "recipe"))
    meta = CheckpointMeta.from_json(state["meta"], run_dir / STATE_FILE)
    model = rebuild(meta)
    return _execute(model, meta, recipe, config, on_event or _quiet, state=state,
                    source=run_info.get("checkpoint", "?"))


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} has no {STATE_FILE}: nothing to resume (is it a run folder?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or hostile file
        raise RunError(f"{path} is not a readable train state ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RunError(f"{path} is not a gct-surgery train state of version {STATE_VERSION}")
    return state


def _execute(model: nn.Module, meta: CheckpointMeta, recipe: Recipe, config: TrainConfig,
             on_event: Event, *, state: dict | None, source: str) -> RunResult:
    started = time.perf_counter()
    device = distributed.device_for(config.device)
    ctx = distributed.init(device)
    try:
        if config.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {config.batch_size} (global) must divide evenly "
                            f"among {ctx.world_size} processes")
        _check_fault_spec()
        seed_everything(config.seed)
        task = load_task(config.task)

        # Data: the checkpoint's input size and normalisation, through timm.
        from .data import resolve_data_config

        data_cfg = resolve_data_config(meta.data, model, img_size=config.img_size)
        train_set, val_set = task.datasets(Path(config.data), data_cfg, augment=config.augment)

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
        run.data_report = _scan_report(train_set, val_set)
        if config.strict:
            from .data import check_strict

            check_strict(run.data_report)
        if config.ema:
            from timm.utils import ModelEmaV3

            run.ema = ModelEmaV3(model, decay=config.ema_decay)
        if state is not None:
            _restore(run, state)
            if ctx.is_main:
                _remove_stale_temps(run.run_dir)
        elif ctx.is_main:
            _write_run_info(run, source)

        with StopFlag() as stop:
            run.stop = stop
            try:
                while run.stage_index < len(recipe.stages):
                    run_stage(run, recipe.stages[run.stage_index])
                    run.stage_index += 1
                    run.epoch = run.step_in_epoch = run.stage_step = 0
                    if run.stage_index < len(recipe.stages):
                        _fault("between_stages", run.stage_index)
            except Interrupted:
                if ctx.is_main:
                    with writing(run.run_dir / "metrics.png"):
                        write_plot(run)
                raise
        if ctx.is_main:
            with writing(run.run_dir / "metrics.png"):
                write_plot(run)
        distributed.barrier()
        _gather_report(run)
        return _result(run, time.perf_counter() - started)
    finally:
        # The process group stays up (a --baseline run follows); the caller ends it
        # with distributed.cleanup().
        pass


def _adapt_head(model: nn.Module, meta: CheckpointMeta, config: TrainConfig, task: Task) -> CheckpointMeta:
    from .task import model_num_classes

    n = config.num_classes
    if n is None or n == model_num_classes(model):
        return meta
    torch.manual_seed(config.seed)  # the new head's initialisation is part of the seed
    replace_head(model, n)
    source = copy.deepcopy(meta.source)
    source.setdefault("kwargs", {})["num_classes"] = n
    meta = replace(meta, source=source)
    return meta.with_event("replace_head", num_classes=n)


def _write_run_info(run: Run, source: str) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    info = {"checkpoint": source, "config": asdict(run.config), "recipe": run.recipe.to_dict(),
            "world_size": run.dist.world_size}
    with writing(run.run_dir / "run.json"):
        atomic_write_text(run.run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    with writing(run.run_dir / "recipe.json"):
        atomic_write_text(run.run_dir / "recipe.json", run.recipe.to_json() + "\n")


RUN_FILES = ("last.safetensors", "best.safetensors", STATE_FILE, "metrics.csv", "metrics.jsonl",
             "metrics.png", "run.json", "recipe.json")


def _remove_stale_temps(run_dir: Path) -> None:
    """A process killed mid-write leaves its temp file (``.last.safetensors.XXXX.tmp``);
    the output itself is intact. A resumed run removes those leftovers."""
    for path in run_dir.glob(".*.tmp"):
        if any(path.name.startswith(f".{name}.") for name in RUN_FILES):
            with contextlib.suppress(OSError):
                path.unlink()
                _logger.info("removed %s, left by an interrupted write", path)


def _scan_report(*datasets):
    """What the data folders held besides good images (an empty report for a --task's
    own datasets)."""
    from .data import DataReport

    report = DataReport()
    for ds in datasets:
        if isinstance(getattr(ds, "report", None), DataReport):
            report.merge(ds.report)
    return report


def _gather_report(run: Run) -> None:
    """Under torchrun each rank counted the bad files of its own share: merge them."""
    if not run.dist.enabled:
        return
    import torch.distributed as dist

    from .data import DataReport

    parts: list = [None] * run.dist.world_size
    dist.all_gather_object(parts, run.data_report.to_state())
    report = DataReport()
    for part in parts:
        report.merge(DataReport.from_state(part))
    run.data_report = report


# --- one stage ----------------------------------------------------------------------

def run_stage(run: Run, stage: Stage) -> None:
    """Freeze for the stage, build a fresh optimizer and scheduler, train its epochs."""
    model, cfg = run.model, run.config
    trainable = freeze_for_stage(model, stage)
    run.trainable_max = max(run.trainable_max, trainable)
    optimizer = make_optimizer(model, stage)
    steps_per_epoch = len(run.train_set) // run.dist.world_size // run.per_rank_batch
    if steps_per_epoch == 0:
        raise UserError(f"the train split has {len(run.train_set)} samples, fewer than one "
                        f"global batch of {cfg.batch_size}; lower --batch-size")
    scheduler = make_scheduler(optimizer, stage, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    if run.stage_step:  # resumed mid-stage
        optimizer.load_state_dict(run._resume["optimizer"])
        scheduler.load_state_dict(run._resume["scheduler"])
        if scaler is not None and run._resume.get("scaler"):
            scaler.load_state_dict(run._resume["scaler"])
    scheduler.step_update(run.stage_step)

    train_model = model
    if run.dist.enabled:  # rebuilt per stage: DDP fixes its parameter set at construction
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids)

    from .data import make_loader

    loader = make_loader(run.train_set, run.per_rank_batch, training=True, seed=cfg.seed,
                         workers=cfg.workers, rank=run.dist.rank, world_size=run.dist.world_size,
                         pin_memory=run.device.type == "cuda", report=run.data_report,
                         strict=cfg.strict, on_bad=lambda p, r: run.emit("bad_file", path=p, reason=r))
    run.emit("stage_start", stage=stage.name, kind=stage.kind, epochs=stage.epochs,
             steps_per_epoch=steps_per_epoch, trainable=trainable, epoch=run.epoch,
             step=run.step_in_epoch)
    from .frozen import frozen_base

    cheap = frozen_base(model) if stage.kind == "gates" and cfg.fast_frozen else contextlib.nullcontext()
    with cheap:  # exact classes back on exit; state dicts unchanged while active
        while run.epoch < stage.epochs:
            train_one_epoch(run, stage, train_model, loader, optimizer, scheduler, scaler, steps_per_epoch)
            end_epoch(run, stage, optimizer, scheduler, scaler)
    run.meta = run.meta.with_event("finetune", stage=stage.to_dict(),
                                   epochs=stage.epochs, best=run.best, last=run.rows[-1] if run.rows else None)
    run.emit("stage_end", stage=stage.name)


def train_one_epoch(run: Run, stage: Stage, train_model: nn.Module, loader, optimizer,
                    scheduler, scaler, steps_per_epoch: int) -> None:
    from .data import start_epoch

    cfg, device = run.config, run.device
    epoch_index = sum(s.epochs for s in run.recipe.stages[:run.stage_index]) + run.epoch
    start_epoch(loader, epoch_index, skip_batches=run.step_in_epoch)
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
            _nonfinite_loss(run, stage, loss_value, steps_per_epoch)
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        run.last_lr = optimizer.param_groups[0]["lr"]  # the lr this update used
        run.stage_step += 1
        run.step_in_epoch += 1
        run.process_steps += 1
        scheduler.step_update(run.stage_step)
        n = batch_size_of(run.task, y)
        if not skip:
            if run.ema is not None:
                run.ema.update(run.model, step=run.stage_step)
            run.epoch_sums[0] += loss_value * n
            run.epoch_sums[1] += n
        run.emit("step", stage=stage.name, epoch=run.epoch, step=run.step_in_epoch,
                 steps=steps_per_epoch, loss=loss_value, lr=run.last_lr, images=n)
        saved = False
        if cfg.save_every and run.step_in_epoch % cfg.save_every == 0 and run.step_in_epoch < steps_per_epoch:
            run.epoch_sums[2] += time.perf_counter() - t0
            t0 = time.perf_counter()
            save_state(run, optimizer, scheduler, scaler)
            saved = True
        _fault("after_step", run.process_steps)
        if run.stop is not None and distributed.broadcast_flag(run.stop.requested):
            run.epoch_sums[2] += time.perf_counter() - t0
            if not saved:
                save_state(run, optimizer, scheduler, scaler)
            _stop(run, stage)
    run.epoch_sums[2] += time.perf_counter() - t0


def _nonfinite_loss(run: Run, stage: Stage, value: float, steps_per_epoch: int) -> None:
    """Count a skipped batch, or stop the stage when ``--skip-nonfinite`` is spent.
    Nothing has been written since the last good save, so the run's files stay good."""
    where = (f"stage {stage.name!r}, epoch {run.epoch + 1}, step {run.step_in_epoch + 1} of "
             f"{steps_per_epoch} (update {run.stage_step + 1} of the stage)")
    if run.nonfinite_skipped < run.config.skip_nonfinite:
        run.nonfinite_skipped += 1
        _logger.warning("non-finite loss (%s) at %s: batch skipped", value, where)
        run.emit("nonfinite_skipped", stage=stage.name, epoch=run.epoch, step=run.step_in_epoch + 1,
                 loss=value, skipped=run.nonfinite_skipped, allowed=run.config.skip_nonfinite)
        return
    spent = (f" after skipping {run.nonfinite_skipped} such batch(es), all --skip-nonfinite allows"
             if run.config.skip_nonfinite else "")
    raise NonFiniteLossError(
        f"non-finite loss ({value}) at {where}{spent}. The files in {run.run_dir} are from the "
        "last good save and were not touched. Lower the learning rate (or use --amp off), or "
        "pass --skip-nonfinite N to skip up to N such batches")


def _nonfinite_weight(model: nn.Module) -> str | None:
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _stop(run: Run, stage: Stage) -> None:
    """After SIGINT/SIGTERM, with the state on disk: report and stop."""
    signum = run.stop.signum or signal.SIGINT
    run.emit("interrupted", run_dir=str(run.run_dir), stage=stage.name, epoch=run.epoch,
             step=run.step_in_epoch, signal=signal.Signals(signum).name)
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}; resume with "
                      f"--resume {run.run_dir}", signum)


def end_epoch(run: Run, stage: Stage, optimizer, scheduler, scaler) -> None:
    """Validate, record the row, write last/best/metrics, then the train state."""
    bad = _nonfinite_weight(run.model)
    if bad is not None:  # a finite loss whose update overflowed: never save such weights
        raise NonFiniteLossError(
            f"the weights became non-finite in stage {stage.name!r}, epoch {run.epoch + 1} "
            f"(first: {bad}); nothing of this epoch was written, {run.run_dir} holds the last "
            "good save. Lower the learning rate")
    eval_model = run.ema.module if run.ema is not None else run.model
    metrics = evaluate(eval_model, run.val_set, run.task, run.device, amp=run.config.amp,
                       batch_size=run.per_rank_batch, workers=run.config.workers, ctx=run.dist,
                       report=run.data_report, strict=run.config.strict)
    sums = distributed.all_reduce_sum(torch.tensor(run.epoch_sums[:2], dtype=torch.float64))
    loss_sum, n = sums.tolist()
    seconds = run.epoch_sums[2]
    row = {"epoch": len(run.rows) + 1, "stage": stage.name, "train_loss": loss_sum / max(n, 1),
           "val_loss": metrics["loss"], **{k: metrics[k] for k in run.task.metric_names},
           "lr": run.last_lr, "seconds": round(seconds, 3),
           "images_per_s": round(n / seconds, 1) if seconds > 0 else float("nan")}
    run.rows.append(row)
    improved = run.best is None or _better(run.task, row, run.best)
    if improved:
        run.best = row
    run.epoch += 1
    run.step_in_epoch = 0
    run.epoch_sums = [0.0, 0.0, 0.0]
    if run.dist.is_main:
        meta = run.meta.with_event("finetune", stage=stage.to_dict(), epochs_completed=run.epoch,
                                   metrics=row)
        hint = run.resume_hint
        with writing(run.run_dir / "last.safetensors", hint):
            save(run.model, run.run_dir / "last.safetensors", meta)
        if improved:
            with writing(run.run_dir / "best.safetensors", hint):
                save(eval_model, run.run_dir / "best.safetensors", meta)
        with writing(run.run_dir / f"metrics.{run.config.metrics_format}", hint):
            write_metrics(run)
    save_state(run, optimizer, scheduler, scaler)
    run.emit("epoch_end", row=row, improved=improved)
    if run.stop is not None and distributed.broadcast_flag(run.stop.requested):
        _stop(run, stage)  # a signal during validation or the saves: the state is on disk


def _better(task: Task, row: dict, best: dict) -> bool:
    a, b = row[task.primary_metric], best[task.primary_metric]
    return a > b if task.higher_is_better else a < b


# --- files of a run -----------------------------------------------------------------

def save_state(run: Run, optimizer, scheduler, scaler) -> None:
    """The train state, atomically, rank 0 only: everything ``resume`` needs. Never
    with non-finite weights: a state that cannot train on is not a resumable one."""
    if not run.dist.is_main:
        return
    bad = _nonfinite_weight(run.model)
    if bad is not None:
        raise NonFiniteLossError(
            f"the weights became non-finite (first: {bad}) by step {run.step_in_epoch} of epoch "
            f"{run.epoch + 1} of stage {run.recipe.stages[run.stage_index].name!r}; the state was "
            f"not saved, so {run.run_dir} holds the last good one. Lower the learning rate")
    state = {
        "version": STATE_VERSION,
        "meta": run.meta.to_json(),
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": _plain(scheduler.state_dict()),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": {k: v.detach().cpu() for k, v in run.ema.module.state_dict().items()} if run.ema else {},
        "rng": rng_state(),
        "stage_index": run.stage_index, "epoch": run.epoch, "step_in_epoch": run.step_in_epoch,
        "stage_step": run.stage_step, "epoch_sums": list(run.epoch_sums),
        "rows": json.dumps(run.rows), "best": json.dumps(run.best),
        "trainable_max": run.trainable_max, "last_lr": run.last_lr,
        "data_report": json.dumps(run.data_report.to_state() if run.data_report is not None else {}),
        "nonfinite_skipped": run.nonfinite_skipped,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    hint = run.resume_hint
    with writing(run.run_dir / STATE_FILE, hint), atomic_path(run.run_dir / STATE_FILE) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _plain(d: dict) -> dict:
    """Drop scheduler fields that are not plain data (weights_only must read it back)."""
    ok = (int, float, str, bool, type(None), list, tuple, dict, torch.Tensor)
    return {k: v for k, v in d.items() if isinstance(v, ok)}


def _restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    if run.ema is not None and state.get("ema"):
        run.ema.module.load_state_dict(state["ema"])
    run.stage_index = int(state["stage_index"])
    run.epoch = int(state["epoch"])
    run.step_in_epoch = int(state["step_in_epoch"])
    run.stage_step = int(state["stage_step"])
    run.epoch_sums = [float(v) for v in state["epoch_sums"]]
    run.rows = json.loads(state["rows"])
    run.best = json.loads(state["best"])
    run.trainable_max = int(state["trainable_max"])
    run.last_lr = float(state.get("last_lr", float("nan")))
    run.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
    if state.get("data_report"):
        from .data import DataReport

        run.data_report = DataReport.from_state(json.loads(state["data_report"])).merge(run.data_report)
    run._resume = state
    set_rng_state(state["rng"])
    if run.stage_index >= len(run.recipe.stages):
        run.emit("finished", run_dir=str(run.run_dir))
    run.emit("resumed", stage_index=run.stage_index, epoch=run.epoch, step=run.step_in_epoch)


Run._resume = None  # the train state being resumed from, if any


def write_metrics(run: Run) -> Path:
    """All rows so far, rewritten atomically (so a resumed run never duplicates rows)."""
    if run.config.metrics_format == "jsonl":
        path = run.run_dir / "metrics.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in run.rows))
        return path
    path = run.run_dir / "metrics.csv"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(run.rows[0].keys()))
    writer.writeheader()
    writer.writerows(run.rows)
    atomic_write_text(path, out.getvalue())
    return path


def write_plot(run: Run) -> Path | None:
    """metrics.png: losses and the primary metric per epoch, stage boundaries marked."""
    if not run.rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in run.rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in run.rows], marker="o", label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in run.rows], marker="o", label="val loss")
    key = run.task.primary_metric
    ax_metric.plot(epochs, [r[key] for r in run.rows], marker="o", color="C2", label=f"val {key}")
    for ax in (ax_loss, ax_metric):
        previous = None
        for r in run.rows:
            if r["stage"] != previous:
                ax.axvline(r["epoch"] - 0.5, color="grey", linestyle="--", linewidth=0.8)
                ax.text(r["epoch"] - 0.45, 0.98, r["stage"], transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, color="grey")
                previous = r["stage"]
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle(f"gct-surgery finetune: {run.run_dir.name}")
    fig.tight_layout()
    path = run.run_dir / "metrics.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _result(run: Run, seconds: float) -> RunResult:
    from ..core.surgery import base_parameter_count

    total = sum(p.numel() for p in run.model.parameters())
    return RunResult(run.run_dir, run.rows, run.best, seconds, total,
                     total - base_parameter_count(run.model), run.trainable_max,
                     data=run.data_report.to_dict() if run.data_report is not None else {},
                     nonfinite_skipped=run.nonfinite_skipped)


# --- the honest comparison ----------------------------------------------------------

def baseline_recipe(recipe: Recipe) -> Recipe:
    """The same budget for the un-gated model: every stage trains everything; a gates
    stage becomes a full stage at the base learning rate for the same epochs."""
    stages = tuple(replace(s, kind="full", freeze_bn=None, train_head=False, train_bn=False)
                   if s.kind == "gates" else s for s in recipe.stages)
    return Recipe(stages, f"{recipe.source} (baseline: gates stages trained in full)")


def finetune_baseline(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
                      on_event: Event | None = None) -> RunResult:
    """Fine-tune the checkpoint's model *without* its gates, same data, seed and epochs,
    into ``config.out``/baseline."""
    from ..core.surgery import remove

    loaded = load_checkpoint(checkpoint)
    model, meta = loaded.model, loaded.meta
    remove(model)
    meta = replace(meta, gate={}, gated=[]).with_event("remove_gates")
    out = Path(config.out) / "baseline"
    if (out / STATE_FILE).exists():
        raise RunError(f"{out} already holds a baseline run; choose another --out")
    base_config = replace(config, out=str(out))
    return _execute(model, meta, baseline_recipe(recipe), base_config, on_event or _quiet,
                    state=None, source=f"{checkpoint} (gates removed)")


def comparison(gated: RunResult, baseline: RunResult, metric_names: tuple[str, ...]) -> list[dict]:
    """Side-by-side rows: best metrics, time and parameters."""
    rows = []
    for key in ("val_loss", *metric_names):
        rows.append({"what": f"best {key}", "gct": (gated.best or {}).get(key),
                     "baseline": (baseline.best or {}).get(key)})
    rows += [
        {"what": "seconds", "gct": round(gated.seconds, 1), "baseline": round(baseline.seconds, 1)},
        {"what": "parameters", "gct": gated.params, "baseline": baseline.params},
        {"what": "gate parameters", "gct": gated.gate_params, "baseline": baseline.gate_params},
    ]
    for r in rows:
        a, b = r["gct"], r["baseline"]
        r["difference"] = (a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
    return rows
