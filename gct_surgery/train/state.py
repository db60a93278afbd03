"""The state of a run: where it stands (``Progress``), the objects it trains with
(``Run``), the train state file that lets a killed run resume bit for bit, and the
checks a resume makes on the world it finds (``check_world``) and on an extension
(``--resume RUN --epochs N``, ``extend_run``).

The train state is a plain dict (tensors, numbers, strings, lists, dicts): the model,
optimizer, scheduler, scaler and EMA state, every RNG, and the progress. Written
atomically, read back with ``torch.load(weights_only=True)`` (a hostile file cannot run
code) and not re-checked field by field: a file cut short or foreign is one line.

The state file is the one record of a run: it also holds what the run started from
(``run``: checkpoint, config, recipe, and the data it trains on, ``data_record``), so
``run.json`` is only a copy for people. Before the first step of a resume,
``check_world`` compares the data as it is now with that record: class names or their order changed (a folder renamed, added or removed) is
refused, naming the classes, since labels are folder positions; a split's size or
files changed is a warning. State tensors that do not fit the model, or are not
finite, are refused (``loop._restore``: torch's own shape check, as one line).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..io.atomic import atomic_write_bytes
from ..io.state_dicts import first_nonfinite, refuse_nonfinite
from ..io.metadata import CheckpointMeta
from . import distributed
from .config import TrainConfig, ema_decay_for
from .data import DataReport
from .layouts import SHOWN
from .faults import NonFiniteLossError, RunError, StopFlag, writing
from .outputs import RunDir, rebuild_record, with_extension
from .recipe import Recipe
from .task import Task

_logger = logging.getLogger(__name__)
STATE_VERSION = 3
Event = Callable[[str, dict], None]


@dataclass
class EpochSums:
    """The epoch in progress, summed so far: its train loss and speed come from these."""

    loss_sum: float = 0.0  # loss * samples
    samples: float = 0.0
    seconds: float = 0.0


@dataclass
class Progress:
    """Everything about a run's position and history that a resume must restore."""

    stage_index: int = 0
    epoch: int = 0                 # within the stage: the epoch in progress
    step_in_epoch: int = 0         # completed steps of that epoch (a step: one update, of
                                   # grad_accum loader micro-batches; count_steps)
    stage_step: int = 0            # completed updates in the stage (the scheduler's clock)
    epoch_sums: EpochSums = field(default_factory=EpochSums)
    rows: list[dict] = field(default_factory=list)  # one per completed epoch, as in metrics.csv
    best: dict | None = None       # the row with the best primary metric
    trainable_max: int = 0
    last_lr: float = float("nan")  # the gates' lr in the latest update
    last_base_lr: float = float("nan")  # the base weights' lr in the latest update
    nonfinite_skipped: int = 0     # batches skipped for a non-finite loss (whole run)
    data_report: Any = None        # DataReport: bad files skipped, files ignored
    global_step: int = 0           # updates over the whole run (the EMA's clock)
    stages: list[dict] = field(default_factory=list)  # one summary per finished stage
    val_samples: int = 0           # validation samples a row is measured on

    def add_row(self, row: dict, primary_metric: str, higher_is_better: bool, *,
                eligible: bool = True) -> bool:
        """Record a row; True when it is the new best. Row 0 (before training) is not
        ``eligible``: best.safetensors is always a trained model."""
        self.rows.append(row)
        if not eligible:
            return False
        if self.best is not None:
            a, b = row[primary_metric], self.best[primary_metric]
            if not (a > b if higher_is_better else a < b):
                return False
        self.best = row
        return True

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = EpochSums()

    def to_state(self) -> dict:
        """Plain data for the state file (the data report's fields too)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict, data_report: Any) -> "Progress":
        """The progress ``state`` saved; ``data_report`` (what this process has counted
        so far) is merged into the saved report."""
        saved = {f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state}
        if saved.get("data_report"):
            data_report = DataReport(**saved["data_report"]).merge(data_report)
        return cls(**{**saved, "epoch_sums": EpochSums(**saved["epoch_sums"]),
                      "data_report": data_report})


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
    ema: Any = None                # timm's ModelEmaV3, under --ema
    stop: StopFlag | None = None   # run_recipe always gives one
    progress: Progress = field(default_factory=Progress)
    resume_from: dict | None = None  # the train state resumed from: its stage's optimizer...
    record: dict = field(default_factory=dict)  # what the run started from (outputs.run_record)
    machine: Any = None            # distributed.MachineChoice: threads and loader workers

    @property
    def resume_hint(self) -> str:
        if RunDir(self.run_dir).state.is_file():
            return ("; fix the cause and continue with: "
                    f"gct-surgery finetune --resume {self.run_dir}")
        return "; fix the cause and start the run again"

    @property
    def per_rank_batch(self) -> int:
        return self.config.batch_size // self.dist.world_size

    def emit(self, event: str, **info: Any) -> None:
        if self.dist.is_main:
            self.on_event(event, info)


# --- the state file -------------------------------------------------------------------

def write_state(run: Run, optimizer, scheduler, scaler) -> None:
    """Everything a resume needs, written atomically (a failed write keeps the old one);
    rank 0 only."""
    if not run.dist.is_main:
        return
    progress, model = run.progress, run.model
    refuse_nonfinite_weights(run)
    state = {
        "version": STATE_VERSION,
        "meta": run.meta.to_json(),
        "model": _cpu(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),  # timm's: plain numbers and lists
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": _cpu(run.ema.module) if run.ema is not None else {},
        "rng": rng_state(),
        "run": run.record,
        **progress.to_state(),
    }
    save_state(run.run_dir, state, run.resume_hint)
    note_position(run)


def save_state(run_dir: Path, state: dict, hint: str) -> None:
    """The state file, written atomically: a failed write keeps the old one."""
    buffer = io.BytesIO()  # not torch.save(state, tmp): on a full disk it raises a RuntimeError
    torch.save(state, buffer)
    path = RunDir(run_dir).state
    with writing(path, hint):
        atomic_write_bytes(path, buffer.getvalue())


def refuse_nonfinite_weights(run: Run) -> None:
    """Never save non-finite weights (a finite loss whose update overflowed): a state
    that cannot train on is not a resumable one."""
    bad = first_nonfinite(run.model)
    if bad is not None:
        p = run.progress
        raise NonFiniteLossError(
            f"the weights became non-finite (first: {bad[0]}) in stage "
            f"{run.recipe.stages[p.stage_index].name!r}, epoch {p.epoch + 1}, step "
            f"{p.step_in_epoch}; nothing was written since the last good save, which "
            f"{run.run_dir} holds. Lower the learning rate")


def note_position(run: Run) -> None:
    """Where the state on disk stands, for the message of a hard stop."""
    p, stages = run.progress, run.recipe.stages
    run.stop.saved = (f"stage {stages[min(p.stage_index, len(stages) - 1)].name!r} with "
                      f"{p.epoch} epoch(s) and {p.step_in_epoch} step(s) done")


def _cpu(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def read_state(run_dir: Path) -> dict:
    """The train state of ``run_dir``, read safely; a ``RunError`` line when there is
    none, or it is not one this version of the tool wrote."""
    path = RunDir(run_dir).state
    if not path.is_file():
        raise RunError(f"{run_dir} has no {path.name}: nothing to resume (is it a run folder?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or hostile file
        raise RunError(f"{path} is not a readable train state ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RunError(f"{path} is not a train state this gct-surgery reads (version "
                       f"{STATE_VERSION}; another version wrote it, or another tool); start the "
                       "run again with a new --out")
    return state


def recorded_run(run_dir: Path, state: dict, **overrides) -> tuple[TrainConfig, Recipe, str]:
    """The config (with ``overrides``), recipe and checkpoint the state's record holds."""
    record = state.get("run") if isinstance(state.get("run"), dict) else {}
    config, recipe = rebuild_record(RunDir(run_dir).state, record, **overrides, out=str(run_dir))
    return config, recipe, str(record.get("checkpoint", ""))


# --- random number generators -------------------------------------------------------

def rng_state() -> dict:
    """Every RNG as plain types and tensors (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                       float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the world a run starts or resumes in ---------------------------------------------

def count_steps(samples: int, batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Updates per epoch: each rank takes whole batches of its share of the samples, and
    one update takes ``grad_accum`` of them (the loader batches ``grad_accum`` x its
    batch, so a step is one loader batch and a resume skips whole updates)."""
    return samples // world_size // max(batch_size // world_size, 1) // grad_accum


def data_record(task: Any, train_set: Any, val_set: Any, config: TrainConfig,
                world_size: int) -> dict:
    """What a run records about its data at the start."""
    names = getattr(task, "class_names", None)
    record: dict = {"class_names": list(names) if names else None,
                    "splits": {"train": len(train_set), "val": len(val_set)},
                    "steps_per_epoch": count_steps(len(train_set), config.batch_size, world_size)}
    prints = {split: ds.fingerprint() for split, ds in (("train", train_set), ("val", val_set))
              if callable(getattr(ds, "fingerprint", None))}
    if prints:
        record["fingerprint"] = prints
    if config.val_split:  # val is this share of train, held out per class (train/layouts.py)
        record["val_split"] = {"fraction": config.val_split, "seed": config.seed}
    if config.class_map:
        record["class_map"] = config.class_map
    return record


def check_world(state: dict | None, meta: CheckpointMeta, config: TrainConfig, task: Any,
                splits: tuple, world_size: int) -> None:
    """Before a resume trains: the data and the tensors it resumes from are the ones the
    run had (see the module doc). Nothing to check for a new run."""
    if state is None:
        return
    run_dir = Path(config.out)
    recorded = state["run"].get("data") or {}
    now = data_record(task, *splits, config, world_size)
    _check_classes(recorded.get("class_names") or meta.data.get("class_names"),
                   now["class_names"], config.data, run_dir)
    _warn_data_changes(recorded, now, config.data)
    refuse_nonfinite(state["model"].items(), RunDir(run_dir).state, "resumed")


def _names(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return f"[{', '.join(names[:SHOWN])}{more}]"


def _check_classes(before: list[str] | None, now: list[str] | None, data: str,
                   run_dir: Path) -> None:
    if not before or not now or list(before) == list(now):
        return
    gone = [c for c in before if c not in now]
    new = [c for c in now if c not in before]
    change = "; ".join(p for p in (f"gone: {', '.join(gone[:SHOWN])}" if gone else "",
                                   f"new: {', '.join(new[:SHOWN])}" if new else "")
                       if p) or "reordered"
    fix = (f"start a new run (another --out, with --num-classes {len(now)})"
           if len(now) != len(before) else "start a new run with another --out")
    raise RunError(
        f"the classes in {data} changed since {run_dir} started: it trained on "
        f"{_names(list(before))}, "
        f"the folder now has {_names(list(now))} ({change}). Labels are folder positions, so "
        f"resuming would train with shifted labels; restore the folder names, or {fix}")


def _warn_data_changes(recorded: dict, now: dict, data: str) -> None:
    was, prints = recorded.get("splits") or {}, recorded.get("fingerprint") or {}
    prints_now = now.get("fingerprint", {})
    changes = [f"{split} {was[split]} -> {n} images" if was.get(split, n) != n
               else f"{split}: files renamed or replaced ({n} images)"
               for split, n in now["splits"].items()
               if was.get(split, n) != n or prints.get(split) not in (None, prints_now.get(split))]
    if changes:
        _logger.warning("the data in %s changed since the run started (%s); the resumed run "
                        "trains on the data as it is now, so it will not match an uninterrupted "
                        "run", data, "; ".join(changes))


# --- a run extended when it resumes: finetune --resume RUN --epochs N -------------------

def refuse_fixed(options: Iterable[str], fixed_by: str) -> None:
    """Options given with ``--resume`` that the run's record fixes: one line naming the
    first, what fixes it, and what to do instead."""
    for option in options:
        raise UserError(f"{option} cannot change when resuming: {fixed_by} fixes it; start a "
                        f"new run with -o NEW_DIR (with --resume only --epochs, --data, --strict "
                        f"and --skip-nonfinite may be given)")


def extended(recipe: Recipe, epochs: int, from_stage: int) -> Recipe:
    """``recipe`` with ``epochs`` epochs in every stage from ``from_stage`` on (a finished
    run's last stage is in progress: it is extended and continues, optimizer and all)."""
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: give a whole number of 1 or more")
    return Recipe(tuple(replace(s, epochs=epochs) if i >= from_stage else s
                        for i, s in enumerate(recipe.stages)), recipe.source)


def check_extension(state: dict, before: Recipe, after: Recipe, run_dir: Path) -> None:
    """The new recipe keeps the finished stages and gives the stage in progress at least
    the epochs it has done."""
    i, done, step = state["stage_index"], state["epoch"], state["step_in_epoch"]
    if before.stages[:i] != after.stages[:i] or len(before.stages) != len(after.stages):
        raise UserError(f"{run_dir} has finished stages the new epochs would change; start a new "
                        "run with -o NEW_DIR")
    least = done + (1 if step else 0)
    stage = after.stages[i]
    if stage.epochs < least:
        raise UserError(f"--epochs {stage.epochs}: stage {stage.name!r} of {run_dir} has already "
                        f"{'started' if step else 'done'} epoch {least}; give --epochs {least} "
                        "or more")


def extend_run(run_dir: Path, state: dict, epochs: int,
               new_recipe: Callable[[Recipe], Recipe] | None = None, *,
               record: bool = True) -> Recipe:
    """Give the run in ``run_dir`` its extended recipe (by default: ``epochs`` in every
    stage from the one in progress on), checked against ``state`` and recorded in its
    state file with a ``history`` entry (``record=False``: checked only). Everything else
    a run records is fixed (``refuse_fixed``). An EMA whose decay followed the run's
    length keeps the decay it had."""
    config, before, _ = recorded_run(run_dir, state)
    after = (new_recipe or (lambda r: extended(r, epochs, state["stage_index"])))(before)
    check_extension(state, before, after, run_dir)
    if not record:
        return after
    changes = {}
    steps = steps_per_epoch(state)
    if config.ema and config.ema_decay is None and steps:
        total = sum(steps // s.grad_accum * s.epochs for s in before.stages)
        changes["ema_decay"] = ema_decay_for(config, total)
    state["run"] = with_extension(state["run"], after, epochs=epochs, config_changes=changes)
    if distributed.is_main_process():  # every rank extends alike; one writes
        save_state(run_dir, state, "; nothing was changed, run the same command again")
    return after


def steps_per_epoch(state: dict) -> int | None:
    """The steps of an epoch, as the run recorded them at the start."""
    return (state["run"].get("data") or {}).get("steps_per_epoch")
