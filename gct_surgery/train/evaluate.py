"""Evaluation: loss and the task's metrics over a data set, exact across ranks, and the
``eval`` command's whole job on a checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.gate import set_gate_impl
from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from . import distributed
from .device import autocast, batch_size_of, to_device
from .task import Task


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: Task, device: torch.device, *, amp: str = "off",
             batch_size: int = 64, workers: int = 0, ctx: distributed.Dist = distributed.Dist(),
             per_class: int | None = None, report=None, strict: bool = False) -> dict:
    """Loss and the task's metrics over ``dataset``, exact across ranks.

    ``per_class=C`` (classification) also returns per-class counts and correct counts.
    Unreadable images are replaced and counted into ``report`` (a ``data.DataReport``),
    or raise under ``strict``.
    """
    from .data import make_loader

    loader = make_loader(dataset, batch_size, training=False, workers=workers,
                         rank=ctx.rank, world_size=ctx.world_size, report=report, strict=strict)
    was_training = model.training
    model.eval()
    names = list(task.metric_names)
    sums = torch.zeros(2 + len(names), dtype=torch.float64)  # loss*n, n, metrics...
    counts = torch.zeros(per_class or 0, dtype=torch.float64)
    correct = torch.zeros(per_class or 0, dtype=torch.float64)
    try:
        for x, y in loader:
            x, y = to_device(x, device), to_device(y, device)
            with autocast(device, amp):
                out = model(x)
            n = batch_size_of(task, y)
            batch = task.metric_sums(out, y)
            sums += torch.tensor([task.loss(out, y).item() * n, n, *(batch[k] for k in names)],
                                 dtype=torch.float64)
            if per_class:
                pred = out.argmax(1).cpu()
                yc = y.cpu()
                counts += torch.bincount(yc, minlength=per_class).double()
                correct += torch.bincount(yc[pred == yc], minlength=per_class).double()
    finally:
        model.train(was_training)
    sums = distributed.all_reduce_sum(sums)
    n = max(sums[1].item(), 1.0)
    result = {"loss": sums[0].item() / n, "samples": int(sums[1].item()),
              **{k: sums[2 + i].item() / n for i, k in enumerate(names)}}
    if per_class:
        result["per_class_count"] = distributed.all_reduce_sum(counts).long().tolist()
        result["per_class_correct"] = distributed.all_reduce_sum(correct).long().tolist()
    return result


@dataclass
class EvalResult:
    checkpoint: str
    split: str
    loss: float
    top1: float
    top5: float
    samples: int
    per_class: list[dict]
    data: dict = field(default_factory=dict)  # data.DataReport.to_dict(): bad files skipped...

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, split: str = "val",
                        batch_size: int = 64, workers: int = 2, device: str = "auto",
                        amp: str = "off", img_size: int | None = None,
                        strict: bool = False, impl: str = "fast") -> EvalResult:
    """Loss, top-1, top-5 and per-class accuracy of a checkpoint on one split.
    Unreadable images are skipped and reported in ``data`` (``strict``: an error)."""
    from .data import create_transform, open_split, resolve_data_config
    from .task import ClassificationTask, model_num_classes

    loaded = load_checkpoint(checkpoint)
    model, meta = loaded.model, loaded.meta
    set_gate_impl(model, impl)
    dev = distributed.device_for(device)
    cfg = resolve_data_config(meta.data, model, img_size=img_size)
    names = meta.data.get("class_names")
    class_to_idx = {c: i for i, c in enumerate(names)} if names else None
    dataset = open_split(data, split, transform=create_transform(cfg, training=False),
                         class_to_idx=class_to_idx, strict=strict)
    report = dataset.report
    classes = names or dataset.classes
    n_out = model_num_classes(model)
    if n_out is not None and n_out < len(classes):
        raise UserError(f"{split} has {len(classes)} classes but the model predicts {n_out}; "
                        "is this the data it was fine-tuned on?")
    task = ClassificationTask()
    model.to(dev)
    r = evaluate(model, dataset, task, dev, amp=amp, batch_size=batch_size, workers=workers,
                 per_class=max(len(classes), n_out or 0), report=report, strict=strict)
    rows = [{"class": c, "images": r["per_class_count"][i],
             "top1": 100.0 * r["per_class_correct"][i] / r["per_class_count"][i] if r["per_class_count"][i] else float("nan")}
            for i, c in enumerate(classes)]
    return EvalResult(str(checkpoint), split, r["loss"], r["top1"], r["top5"], r["samples"], rows,
                      report.to_dict())
