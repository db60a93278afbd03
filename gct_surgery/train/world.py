"""A resumed run must find the world it started in, or say what changed.

At the start, ``run.json`` records the data a run trains on (``data_record``): its
class names in label order, the size of each split, a fingerprint of each split's
files and the steps of an epoch. Before the first step of a resume, ``check_world``
compares the data as it is now with that record and the train state with the recipe:

- class names or their order changed (a folder renamed, added or removed): refused,
  naming the classes; labels are folder positions, so training on would shift them;
- a split's size or files changed: a warning (the run continues on the data as it is,
  and will not match an uninterrupted one);
- a stage, epoch or step out of the recipe's range, a metrics history of the wrong
  length, model tensors that do not fit the model, or non-finite weights: refused.

``state.pt`` and ``run.json`` are also validated field by field when read
(``progress.check_state``, ``outputs.read_run_info``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..io.metadata import CheckpointMeta
from .config import TrainConfig
from .faults import RunError, refuse_nonfinite
from .outputs import read_run_json
from .progress import STATE_FILE, damaged
from .recipe import Recipe

_logger = logging.getLogger(__name__)
SHOWN = 8  # class names shown in a message


def load_for_training(checkpoint: str | Path):
    """``load_checkpoint``, refusing a file with NaN or inf weights by name: a run from
    it would fail at its first step, blaming the learning rate."""
    loaded = load_checkpoint(checkpoint)
    refuse_nonfinite(loaded.model, checkpoint, "fine-tuned")
    return loaded


def count_steps(samples: int, batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Updates per epoch: each rank takes whole batches of its share of the samples, and
    one update takes ``grad_accum`` of them (the loader batches ``grad_accum`` x its
    batch, so a step is one loader batch and a resume skips whole updates). Equal to
    the unaccumulated count // ``grad_accum``, since the batch divides among the ranks."""
    return samples // world_size // max(batch_size // world_size, 1) // grad_accum


def with_drop_path(model: nn.Module, meta: CheckpointMeta, rate: float) -> tuple[nn.Module, CheckpointMeta]:
    """The model rebuilt by timm with ``drop_path_rate=rate``, holding the same weights,
    and the record that says so (a timm model built without it has no DropPath to turn
    on). The source's kwargs carry the rate, so a resume or a reload rebuilds the same."""
    import copy
    from dataclasses import replace

    from ..io.checkpoint import rebuild

    spec = str(meta.source.get("spec", ""))
    if not spec.startswith("timm:"):
        raise UserError(f"--drop-path needs a timm model (it is set when timm builds one), and "
                        f"this checkpoint's model comes from {spec or 'an unrecorded source'}; "
                        "run without --drop-path")
    source = copy.deepcopy(meta.source)
    source.setdefault("kwargs", {})["drop_path_rate"] = rate
    meta = replace(meta, source=source)
    rebuilt = rebuild(meta)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt, meta.with_event("drop_path", rate=rate)


def data_record(task: Any, train_set: Any, val_set: Any, config: TrainConfig, world_size: int) -> dict:
    """What ``run.json`` records about the data at the start of a run."""
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


def check_world(state: dict | None, meta: CheckpointMeta, model: nn.Module, recipe: Recipe,
                config: TrainConfig, task: Any, splits: tuple, world_size: int) -> None:
    """Before a resume trains: the data, the position and the tensors it resumes from
    are the ones the run had (see the module doc). Nothing to check for a new run."""
    if state is None:
        return
    run_dir = Path(config.out)
    recorded = read_run_json(run_dir).get("data") or {}
    now = data_record(task, *splits, config, world_size)
    _check_classes(recorded.get("class_names") or meta.data.get("class_names"),
                   now["class_names"], config.data, run_dir)
    _warn_data_changes(recorded, now, config.data)
    spe = recorded.get("steps_per_epoch") or now["steps_per_epoch"]  # of unaccumulated batches
    _check_position(state, recipe, spe, run_dir / STATE_FILE)
    path = run_dir / STATE_FILE
    _check_tensors(state["model"], model, path, "model")
    if config.ema and state.get("ema"):
        _check_tensors(state["ema"], model, path, "ema")
    refuse_nonfinite(state["model"].items(), path, "resumed")


def _names(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return f"[{', '.join(names[:SHOWN])}{more}]"


def _check_classes(before: list[str] | None, now: list[str] | None, data: str, run_dir: Path) -> None:
    if not before or not now or list(before) == list(now):
        return
    gone = [c for c in before if c not in now]
    new = [c for c in now if c not in before]
    change = "; ".join(p for p in (f"gone: {', '.join(gone[:SHOWN])}" if gone else "",
                                   f"new: {', '.join(new[:SHOWN])}" if new else "") if p) or "reordered"
    fix = (f"start a new run (another --out, with --num-classes {len(now)})" if len(now) != len(before)
           else "start a new run with another --out")
    raise RunError(
        f"the classes in {data} changed since {run_dir} started: it trained on {_names(list(before))}, "
        f"the folder now has {_names(list(now))} ({change}). Labels are folder positions, so "
        f"resuming would train with shifted labels; restore the folder names, or {fix}")


def _warn_data_changes(recorded: dict, now: dict, data: str) -> None:
    changes = []
    before_sizes, before_prints = recorded.get("splits") or {}, recorded.get("fingerprint") or {}
    for split in ("train", "val"):
        was, is_ = before_sizes.get(split), now["splits"][split]
        if was is not None and was != is_:
            changes.append(f"{split} {was} -> {is_} images")
        elif before_prints.get(split) and before_prints[split] != now.get("fingerprint", {}).get(split):
            changes.append(f"{split}: files renamed or replaced ({is_} images)")
    if changes:
        _logger.warning("the data in %s changed since the run started (%s); the resumed run "
                        "trains on the data as it is now, so it will not match an uninterrupted "
                        "run", data, "; ".join(changes))


def _check_position(state: dict, recipe: Recipe, spe: int, path: Path) -> None:
    """The stage, epoch and step of the state fit the recipe and the data."""
    stages = recipe.stages
    i, epoch, step = state["stage_index"], state["epoch"], state["step_in_epoch"]
    if i >= len(stages):
        raise damaged(path, f"stage_index {i}, but the recipe has {len(stages)} stage(s)")
    spe //= stages[i].grad_accum  # the stage's updates per epoch (count_steps)
    if epoch > stages[i].epochs:
        raise damaged(path, f"epoch {epoch}, but stage {stages[i].name!r} has {stages[i].epochs}")
    if step > spe or (epoch == stages[i].epochs and step):  # a stop after an epoch's last step: spe
        raise damaged(path, f"step_in_epoch {step}, but an epoch has {spe} step(s)")
    if state["stage_step"] not in (0, epoch * spe + step):
        raise damaged(path, f"stage_step {state['stage_step']} does not match epoch {epoch}, step {step}")
    rows = json.loads(state["rows"])
    expected = 1 + sum(s.epochs for s in stages[:i]) + epoch  # row 0, then one per epoch done
    if len(rows) != expected:
        raise damaged(path, f"{len(rows)} metrics rows where the position has {expected}")


def _check_tensors(saved: dict, model: nn.Module, path: Path, what: str) -> None:
    """Every tensor of the model, with its shape, and no other."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    wrong = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if missing:
        raise damaged(path, f"its {what} lacks {missing[0]!r}")
    if extra:
        raise damaged(path, f"its {what} has {extra[0]!r}, which the model does not")
    if wrong:
        raise damaged(path, f"its {what} tensor {wrong[0]!r} has shape {tuple(saved[wrong[0]].shape)}, "
                            f"the model's {tuple(own[wrong[0]].shape)}")
