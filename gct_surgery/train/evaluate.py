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

from ..core.gate import set_gate_impl
from ..core.model import evaluating, model_num_classes
from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..io.state_dicts import refuse_nonfinite
from ..io.metadata import CheckpointMeta
from . import distributed
from .data import DataReport, check_strict, make_loader
from .distributed import autocast, batch_size_of, to_device
from .task import BUILT_IN_TASKS, ClassificationTask, Task, TaskError, load_task


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: Task, device: torch.device, *, amp: str = "off",
             batch_size: int = 64, workers: int = 0, ctx: distributed.Dist = distributed.Dist(),
             breakdown: bool = False, per_image: bool = False) -> dict:
    """Loss and the task's metrics over ``dataset``, exact across ranks: a dict with
    ``loss``, ``samples`` and each of ``task.metric_names``.

    ``per_image=True`` adds ``per_image``, the task's per-image rows (``task.per_image``,
    when it has one) in dataset order, gathered from every rank (unreadable images left
    out), as a float64 CPU tensor.

    ``breakdown=True`` adds ``breakdown``, the task's table rows, when the task has the
    hook (every rank must see at least one batch). An image folder's unreadable images
    are left out (``data.make_loader``).
    """
    loader = make_loader(dataset, batch_size, training=False, workers=workers,
                         rank=ctx.rank, world_size=ctx.world_size)
    names = list(task.metric_names)
    sums: dict[Any, Any] = dict.fromkeys(("loss", "samples", *names), 0.0)
    by_group = breakdown and all(callable(getattr(task, m, None))
                                 for m in ("breakdown_sums", "breakdown"))
    keep = per_image and callable(getattr(task, "per_image", None))
    kept: list[torch.Tensor] = []
    with evaluating(model):
        for x, y in loader:
            x, y = to_device(x, device), to_device(y, device)
            with autocast(device, amp):
                out = model(x)
            n, metric = batch_size_of(task, y), task.metric_sums(out, y)
            batch = {"loss": task.loss(out, y).item() * n, "samples": n,
                     **{k: metric[k] for k in names}}
            if by_group:  # fixed-shape tensors, keyed apart from the metrics
                batch.update({("breakdown", k): v for k, v in task.breakdown_sums(out, y).items()})
            for k, value in batch.items():  # a number, or a tensor of counts
                value = torch.as_tensor(value).detach().to("cpu", torch.float64)
                sums[k] = sums[k] + value if k in sums else value
            if keep:
                kept.append(task.per_image(out, y).detach().to("cpu", torch.float64))
    parts = distributed.all_gather_objects(sums)  # a rank without images holds zeros
    keys = dict.fromkeys(k for part in parts for k in part)
    sums = {k: sum(torch.as_tensor(part.get(k, 0.0), dtype=torch.float64) for part in parts)
            for k in keys}
    n = max(sums["samples"].item(), 1.0)
    finish = getattr(task, "finish", None)  # dataset-level metrics from summed counts
    metrics = finish(sums, int(n)) if callable(finish) else {k: sums[k].item() / n for k in names}
    result = {"loss": sums["loss"].item() / n, "samples": int(sums["samples"].item()),
              **{k: float(metrics[k]) for k in names}}
    if by_group:
        result["breakdown"] = task.breakdown({k[1]: v for k, v in sums.items()
                                              if isinstance(k, tuple)})
    if keep:
        result["per_image"] = _in_order(kept)
    return result


def _in_order(kept: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's per-image rows in dataset order: of W ranks, rank r scored the
    images r, r + W, r + 2W... (``data.make_loader``)."""
    parts = [torch.cat(part) for part in distributed.all_gather_objects(kept) if part]
    if len(parts) < 2:
        return parts[0] if parts else torch.zeros(0, dtype=torch.float64)
    rows = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=torch.float64)
    for rank, part in enumerate(parts):
        rows[rank::len(parts)] = part
    return rows


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
    data: dict = field(default_factory=dict)  # data.DataReport.to_dict(): bad files skipped...
    machine: dict = field(default_factory=dict)  # MachineChoice.to_dict(): threads, workers

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
                        task: str | None = None, class_map: str | None = None,
                        outputs: str | None = None) -> EvalResult:
    """Loss, the task's metrics and its breakdown (per-class accuracy for classification)
    of a checkpoint on one split.

    The task is ``task`` (a ``--task`` string), else the one the checkpoint was
    fine-tuned with, else classification. Unreadable images are skipped and reported in
    ``data`` (``strict``: an error). ``workers``/``threads`` None: auto (distributed.choose).
    """

    from .data import create_transform, resolve_data_config

    loaded = load_checkpoint(checkpoint)
    model, meta = loaded.model, loaded.meta
    refuse_nonfinite(model, checkpoint, "evaluated")  # NaN outputs would make NaN metrics
    set_gate_impl(model, impl)
    dev = distributed.device_for(device)
    chosen = distributed.choose(dev.type, threads=threads, workers=workers)
    torch.set_num_threads(chosen.threads)
    spec, scorer = _task_for(checkpoint, meta, task, outputs)
    cfg = resolve_data_config(meta.data, model, img_size=img_size)
    if isinstance(scorer, ClassificationTask):
        dataset = _classification_split(scorer, model, meta, data, split,
                                        create_transform(cfg, training=False), cfg["input_size"][0],
                                        class_map)
    else:
        if split not in ("train", "val", "validation"):
            raise UserError(f"--task {spec} gives train and val datasets only; "
                            "pass --split val or --split train")
        if callable(getattr(scorer, "open_split", None)):  # a built-in dense task: that split only
            dataset = scorer.open_split(Path(data), cfg, "train" if split == "train" else "val")
        else:
            train, val = scorer.datasets(Path(data), cfg, augment=False)  # no augmentation
            dataset = train if split == "train" else val
        if callable(getattr(scorer, "check_model", None)):
            scorer.check_model(model)
    report = getattr(dataset, "report", None) or DataReport()
    if strict:
        check_strict(report)
    model.to(dev)
    r = evaluate(model, dataset, scorer, dev, amp=amp, batch_size=batch_size,
                 workers=chosen.workers, breakdown=True)
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
    from .layouts import recorded_config

    spec = recorded_config(meta).get("task")
    if spec is None or spec == "classification":
        return None
    if spec in BUILT_IN_TASKS:  # not code: nothing to consent to
        return spec
    if not isinstance(spec, str) or parse_source(spec)[0] != "factory":
        raise TaskError(f"{where}: the recorded task {spec!r:.80} is not a module:object name; "
                        "pass --task to name the task yourself")
    require(spec, named_by=where, what="a task")
    return spec


def _task_for(checkpoint: str | Path, meta: CheckpointMeta, requested: str | None,
              outputs: str | None = None) -> tuple[str, Task]:
    """The task's name and the task: ``requested``, else the recorded one, else
    classification; a saliency model's ``outputs`` as given, else as recorded."""
    from .layouts import recorded_config

    config = {**recorded_config(meta), **({"outputs": outputs} if outputs else {})}
    if requested is not None:
        from ..io.trust import remember

        remember(requested)  # the user named it
        return requested, load_task(requested, config)
    spec = recorded_task(meta, str(checkpoint)) or "classification"
    try:
        return spec, load_task(spec, config)
    except TaskError as e:
        raise TaskError(f"{checkpoint} was fine-tuned with a task that cannot be loaded here "
                        f"({e}); pass --task module:object") from None


def _classification_split(task: ClassificationTask, model: nn.Module, meta: CheckpointMeta,
                          data: str | Path, split: str, transform, channels: int = 3,
                          class_map: str | None = None):
    """The split with the checkpoint's class names (or ``class_map``'s) as labels,
    refused when it has more classes than the model predicts. On a train-only folder,
    the share of train the checkpoint's run held out (``layouts``)."""
    from .layouts import load_class_map, open_split, recorded_options

    names = meta.data.get("class_names")
    if class_map:
        mapped = [c for c, _ in sorted(load_class_map(class_map).items(), key=lambda kv: kv[1])]
        if names and mapped != list(names):
            raise UserError(f"--class-map {class_map} orders the classes otherwise than the "
                            f"checkpoint records ({', '.join(names[:8])}); drop --class-map")
        names = mapped
    class_to_idx = {c: i for i, c in enumerate(names)} if names else None
    dataset = open_split(data, split, recorded_options(meta), class_to_idx=class_to_idx,
                         transform=transform, channels=channels)  # a class not in names: refused
    task.class_names, n_out = dataset.classes, model_num_classes(model)
    if n_out is not None and n_out < len(dataset.classes):
        raise UserError(f"{data} has {len(dataset.classes)} classes and the checkpoint's head "
                        f"{n_out}: evaluate on a folder with the checkpoint's classes, or "
                        f"fine-tune for these first: gct-surgery finetune CHECKPOINT --data "
                        f"{data} --num-classes {len(dataset.classes)} -o RUN")
    return dataset
