"""Evaluation: loss and the task's metrics over a data set, exact across ranks, and the
``eval`` command's whole job on a checkpoint.

Nothing here knows what the task is. Its metric names, its optional breakdown table
(per-class accuracy for classification) and its datasets all come from the ``Task``,
so ``eval`` scores a checkpoint fine-tuned with ``--task`` as well as a classifier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.forward import evaluating
from ..core.gate import set_gate_impl
from ..core.heads import model_num_classes
from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..io.metadata import CheckpointMeta
from . import distributed
from .device import autocast, batch_size_of, to_device
from .faults import refuse_nonfinite
from .images import DataReport, check_strict
from .scan import class_folders, split_dir
from .task import ClassificationTask, Task, TaskError, has_breakdown, load_task


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: Task, device: torch.device, *, amp: str = "off",
             batch_size: int = 64, workers: int = 0, ctx: distributed.Dist = distributed.Dist(),
             report=None, strict: bool = False, breakdown: bool = False,
             per_image: bool = False) -> dict:
    """Loss and the task's metrics over ``dataset``, exact across ranks: a dict with
    ``loss``, ``samples`` and each of ``task.metric_names``.

    ``per_image=True`` adds ``per_image``, the task's per-image rows (``task.per_image``,
    when it has one) in dataset order, gathered from every rank (unreadable images left
    out), as a float64 CPU tensor.

    ``breakdown=True`` adds ``breakdown``, the task's table rows, when the task has the
    hook (every rank must see at least one batch). Unreadable images are dropped and
    counted into ``report`` (an ``images.DataReport``), or raise under ``strict``.
    """
    from .loaders import make_loader

    loader = make_loader(dataset, batch_size, training=False, workers=workers,
                         rank=ctx.rank, world_size=ctx.world_size, report=report, strict=strict)
    names = list(task.metric_names)
    sums = torch.zeros(2 + len(names), dtype=torch.float64)  # loss*n, n, metrics...
    by_group = breakdown and has_breakdown(task)
    group_sums: dict[str, torch.Tensor] = {}
    keep = per_image and callable(getattr(task, "per_image", None))
    kept: list[tuple[list[int], torch.Tensor]] = []
    with evaluating(model):
        for x, y in loader:
            x, y = to_device(x, device), to_device(y, device)
            with autocast(device, amp):
                out = model(x)
            n = batch_size_of(task, y)
            batch = task.metric_sums(out, y)
            sums += torch.tensor([task.loss(out, y).item() * n, n, *(batch[k] for k in names)],
                                 dtype=torch.float64)
            if keep:
                values = task.per_image(out, y).detach().to("cpu", torch.float64)
                kept.append((loader.batch_indices, values))
            if by_group:
                for key, value in task.breakdown_sums(out, y).items():
                    value = value.detach().to("cpu", torch.float64)
                    group_sums[key] = group_sums[key] + value if key in group_sums else value
    sums = distributed.all_reduce_sum(sums)
    n = max(sums[1].item(), 1.0)
    result = {"loss": sums[0].item() / n, "samples": int(sums[1].item()),
              **{k: sums[2 + i].item() / n for i, k in enumerate(names)}}
    if by_group:
        totals = {k: distributed.all_reduce_sum(group_sums[k]) for k in sorted(group_sums)}
        result["breakdown"] = task.breakdown(totals)
    if keep:
        result["per_image"] = _in_order(kept)
    return result


def _in_order(kept: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Every rank's per-image rows, in dataset order (an index met twice counts once)."""
    pairs = [(i, row) for part in distributed.all_gather_objects(kept)
             for indices, values in part for i, row in zip(indices, values)]
    rows = dict(pairs)  # one row per index, however often a padded shard met it
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([rows[i] for i in sorted(rows)])


@dataclass
class EvalResult:
    """One checkpoint scored on one split. ``metrics`` holds ``loss`` and the task's
    metrics by name, each also an attribute (``r.loss``, ``r.top1``, ``r.mae``);
    ``breakdown`` holds the task's table rows, also under ``breakdown_name``
    (``r.per_class`` for classification)."""

    checkpoint: str
    split: str
    task: str
    metrics: dict[str, float]
    primary_metric: str
    higher_is_better: bool
    samples: int
    breakdown: list[dict] = field(default_factory=list)
    breakdown_name: str = "breakdown"
    breakdown_title: str = "breakdown"
    data: dict = field(default_factory=dict)  # images.DataReport.to_dict(): bad files skipped...
    machine: dict = field(default_factory=dict)  # machine.MachineChoice.to_dict(): threads, workers

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__  # not self.metrics: unset while unpickling or copying
        if name in fields.get("metrics", {}):
            return fields["metrics"][name]
        if name == fields.get("breakdown_name"):
            return fields["breakdown"]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict:
        """Flat: the metrics are top-level keys, the rows sit under ``breakdown_name``."""
        return {"checkpoint": self.checkpoint, "split": self.split, "task": self.task,
                **self.metrics, "primary_metric": self.primary_metric,
                "higher_is_better": self.higher_is_better, "samples": self.samples,
                self.breakdown_name: self.breakdown, "data": self.data, "machine": self.machine}


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, split: str = "val",
                        batch_size: int = 64, workers: int | None = None,
                        threads: int | None = None, device: str = "auto",
                        amp: str = "off", img_size: int | None = None,
                        strict: bool = False, impl: str = "fast",
                        task: str | None = None, class_map: str | None = None) -> EvalResult:
    """Loss, the task's metrics and its breakdown (per-class accuracy for classification)
    of a checkpoint on one split.

    The task is ``task`` (a ``--task`` string), else the one the checkpoint was
    fine-tuned with, else classification. Unreadable images are skipped and reported in
    ``data`` (``strict``: an error). ``workers``/``threads`` None: auto (machine.py).
    """
    from . import machine

    from .loaders import create_transform, resolve_data_config

    loaded = load_checkpoint(checkpoint)
    model, meta = loaded.model, loaded.meta
    refuse_nonfinite(model, checkpoint, "evaluated")  # NaN outputs would make NaN metrics
    set_gate_impl(model, impl)
    dev = distributed.device_for(device)
    chosen = machine.choose(dev.type, threads=threads, workers=workers)
    machine.apply(chosen)
    spec, scorer = _task_for(checkpoint, meta, task)
    cfg = resolve_data_config(meta.data, model, img_size=img_size)
    if isinstance(scorer, ClassificationTask):
        dataset = _classification_split(scorer, model, meta, data, split,
                                        create_transform(cfg, training=False), cfg["input_size"][0],
                                        class_map)
    else:
        dataset = _task_split(scorer, spec, data, split, cfg)
        if callable(getattr(scorer, "check_model", None)):
            scorer.check_model(model)
    report = getattr(dataset, "report", None)
    report = report if isinstance(report, DataReport) else DataReport()
    if strict:
        check_strict(report)
    model.to(dev)
    r = evaluate(model, dataset, scorer, dev, amp=amp, batch_size=batch_size, workers=chosen.workers,
                 report=report, strict=strict, breakdown=True)
    return EvalResult(
        str(checkpoint), split, spec,
        metrics={"loss": r["loss"], **{k: r[k] for k in scorer.metric_names}},
        primary_metric=scorer.primary_metric, higher_is_better=scorer.higher_is_better,
        samples=r["samples"], breakdown=r.get("breakdown", []),
        breakdown_name=getattr(scorer, "breakdown_name", "breakdown"),
        breakdown_title=getattr(scorer, "breakdown_title", "breakdown"), data=report.to_dict(),
        machine=chosen.to_dict())


def recorded_task(meta: CheckpointMeta, where: str = "checkpoint") -> str | None:
    """The ``--task`` the checkpoint was last fine-tuned with (its last ``recipe``
    event), or None for classification.

    A checkpoint is untrusted data and a task is code that gets imported, so it runs
    only with the user's consent, like a recorded model factory (``trust``).
    """
    from ..io.sources import parse_source
    from ..io.trust import require

    recipes = [e for e in meta.history if isinstance(e, dict) and e.get("action") == "recipe"]
    config = recipes[-1].get("config") if recipes else None
    spec = config.get("task") if isinstance(config, dict) else None
    if spec is None or spec == "classification":
        return None
    if not isinstance(spec, str) or parse_source(spec)[0] != "factory":
        raise TaskError(f"{where}: the recorded task {spec!r:.80} is not a module:object name; "
                        "pass --task to name the task yourself")
    require(spec, named_by=where, what="a task")
    return spec


def _task_for(checkpoint: str | Path, meta: CheckpointMeta, requested: str | None) -> tuple[str, Task]:
    """The task's name and the task: ``requested``, else the recorded one, else
    classification."""
    if requested is not None:
        from ..io.trust import remember

        remember(requested)  # the user named it
        return requested, load_task(requested)
    spec = recorded_task(meta, str(checkpoint))
    if spec is None:
        return "classification", load_task(None)
    try:
        return spec, load_task(spec)
    except TaskError as e:
        raise TaskError(f"{checkpoint} was fine-tuned with a task that cannot be loaded here "
                        f"({e}); pass --task module:object") from None


def _classification_split(task: ClassificationTask, model: nn.Module, meta: CheckpointMeta,
                          data: str | Path, split: str, transform, channels: int = 3,
                          class_map: str | None = None):
    """The split with the checkpoint's class names (or ``class_map``'s) as labels,
    refused when it has more classes than the model predicts. On a train-only folder,
    the share of train the checkpoint's run held out (``layouts``)."""
    from .layouts import load_class_map, open_eval_split, read_csv_split, recorded_options, split_source

    names = meta.data.get("class_names")
    if class_map:
        mapped = [c for c, _ in sorted(load_class_map(class_map).items(), key=lambda kv: kv[1])]
        if names and mapped != list(names):
            raise UserError(f"--class-map {class_map} orders the classes otherwise than the checkpoint "
                            f"records ({', '.join(names[:8])}); drop --class-map")
        names = mapped
    n_out = model_num_classes(model)
    folder = split_source(data, split) or split_source(data, "train") or split_dir(data, split)
    found = class_folders(folder) if folder.is_dir() else read_csv_split(folder, Path(data))[2]
    if (names and any(c not in names for c in found)) or (n_out is not None and n_out < len(found)):
        raise _class_mismatch(folder, found, names, n_out)
    class_to_idx = {c: i for i, c in enumerate(names)} if names else None
    dataset = open_eval_split(data, split, recorded_options(meta), class_to_idx=class_to_idx,
                              transform=transform, channels=channels)
    classes = names or dataset.classes
    if n_out is not None and n_out < len(classes):
        raise _class_mismatch(folder, list(classes), names, n_out)
    task.class_names = list(classes)
    return dataset


def _class_mismatch(folder: Path, found: list[str], names: list[str] | None,
                    n_out: int | None) -> UserError:
    """The data's classes are not the checkpoint's: say both, and the two ways on."""
    head = f"{n_out}" if n_out is not None else f"{len(names or ())}"
    known = f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""
    return UserError(
        f"{folder} has {len(found)} classes ({', '.join(found[:8])}{', ...' if len(found) > 8 else ''}) "
        f"and the checkpoint's head {head}{known}: evaluate on a folder with the checkpoint's "
        f"classes, or fine-tune for these first: gct-surgery finetune CHECKPOINT --data {folder.parent} "
        f"--num-classes {len(found)} -o RUN")


def _task_split(task: Task, spec: str, data: str | Path, split: str, cfg: dict):
    """A ``--task`` gives a train and a val dataset; the split picks one (no augmentation)."""
    if split not in ("train", "val", "validation"):
        raise UserError(f"--task {spec} gives train and val datasets only; "
                        "pass --split val or --split train")
    train, val = task.datasets(Path(data), cfg, augment=False)
    return train if split == "train" else val
