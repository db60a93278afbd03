"""What a training task provides, so that one loop serves any model.

The training loop and evaluation know nothing about classification: they ask a
``Task`` for the datasets, the loss and the metrics. ``ClassificationTask`` is the
built-in one.
Another kind of model (U^2-Net for saliency, a segmenter, a detector) passes
``--task module:object`` (or ``path/to/file.py:object``) naming a class, a factory or
an instance that has these members::

    class MyTask:
        metric_names = ("mae",)          # columns of metrics.csv
        primary_metric = "mae"           # best.safetensors is chosen by it
        higher_is_better = False

        def datasets(self, data_dir, data_config, *, augment):
            return train_dataset, val_dataset     # items are (input, target)

        def loss(self, output, target):           # a scalar tensor
            ...

        def metric_sums(self, output, target):    # {name: sum over the batch}
            ...

``metric_sums`` returns *sums* over the batch, not means: the loop adds them over
batches and ranks and divides by the sample count, so the numbers are exact under
torchrun. ``output`` is what the model returns, as it is: a tuple of side outputs
(deep supervision) arrives as the tuple, and a model that ends in a sigmoid gives
probabilities (``binary_cross_entropy``, not ``..._with_logits``). ``data_config``
holds the checkpoint's recorded preprocessing (mean, std...). A task file imports with
its own folder on the import path, so it may import the modules beside it.
docs/finetuning.md has examples for sigmoid outputs, side outputs and segmentation.
Optional: ``check_model(model)`` (raise a ``UserError`` when the model does not fit
the data), ``class_names`` (stored in the checkpoint), ``batch_size(target)`` (samples
in a batch; default ``len(target)``), ``soft_targets = True`` (its loss also takes
(N, classes) probabilities, so ``--mixup``/``--cutmix``/``--smoothing`` may apply).

Optional, for ``gct-surgery eval``'s table: ``breakdown_sums(output, target)`` returns
fixed-shape tensors (per-class counts, say) that evaluation sums over batches and
ranks, and ``breakdown(sums)`` turns the totals into rows (dicts with the same keys).
``breakdown_name`` names the rows in ``--json`` and ``breakdown_title`` heads the
table. ``ClassificationTask`` gives the per-class accuracy this way.

Optional, for ``--baseline``'s verdict: ``per_image(output, target)`` returns one row
per sample, a tensor of shape (N,) whose mean over the validation set is the primary
metric (classification: 100 x correct, so the mean is top-1 in %), or (N, K) per-image
statistics with ``reduce(rows) -> float`` (a numpy (N, K) array in, the dataset-level
metric out: max F-measure, mIoU from per-image intersections and unions). A task
without it gets a comparison without a verdict interval.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.model import classifier_name, model_num_classes
from ..errors import UserError
from .config import setting
from .data import create_transform
from .layouts import DataOptions, open_datasets


class TaskError(UserError):
    """A ``--task`` cannot be imported or lacks a required member."""


Task = Any  # any object with the members the module docstring lists (load_task checks them)


class ClassificationTask:
    """Image classification on an image folder: cross-entropy, top-1 and top-5 (%), and
    per-class top-1 as its breakdown."""

    metric_names = ("top1", "top5")
    primary_metric = "top1"
    higher_is_better = True
    breakdown_name = "per_class"
    breakdown_title = "per-class accuracy"

    def __init__(self, options: DataOptions | None = None) -> None:
        self.class_names: list[str] | None = None
        self.options = options or DataOptions()  # held-out share, class map, augmentation

    def datasets(self, data_dir: Path, data_config: dict, *, augment: bool
                 ) -> tuple[Dataset, Dataset]:
        options = self.options
        train, val = open_datasets(
            data_dir, options, channels=data_config["input_size"][0],
            train_transform=create_transform(data_config, training=True, augment=augment,
                                             crop_scale=options.crop_scale, hflip=options.hflip,
                                             color_jitter=options.color_jitter),
            val_transform=create_transform(data_config, training=False))
        self.class_names = train.classes
        return train, val

    def check_model(self, model: nn.Module) -> None:
        n_out = model_num_classes(model)
        if self.class_names is not None and n_out is not None and n_out != len(self.class_names):
            raise UserError(f"the data has {len(self.class_names)} classes and the model's head "
                            f"{n_out} (layer {classifier_name(model)!r}); pass --num-classes "
                            f"{len(self.class_names)} to replace the head")

    soft_targets = True  # loss takes mixup's (N, classes) probabilities too (stages.py)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2 and target.is_floating_point():  # mixed, smoothed targets
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()(logits(output), target)
        return nn.functional.cross_entropy(logits(output), target)

    def metric_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        from timm.utils import accuracy

        top1, top5 = accuracy(logits(output), target, topk=(1, 5))  # percent of the batch
        n = target.size(0)
        return {"top1": top1.item() * n, "top5": top5.item() * n}

    def per_image(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """100 for each image whose top class is right, else 0: the mean is top-1 (%)."""
        top = logits(output).topk(1, 1, True, True).indices[:, 0]  # as timm's accuracy picks
        return 100.0 * (top == target).double()

    def breakdown_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = logits(output)
        size = max(out.shape[1], len(self.class_names or ()))  # the same every batch
        hit = out.argmax(1) == target
        return {"images": torch.bincount(target, minlength=size),
                "correct": torch.bincount(target[hit], minlength=size)}

    def breakdown(self, sums: dict[str, torch.Tensor]) -> list[dict]:
        """One row per class: its images and its top-1 (%; NaN for a class without any)."""
        images, correct = sums["images"].tolist(), sums["correct"].tolist()
        names = self.class_names or [str(i) for i in range(len(images))]
        return [{"class": c, "images": int(n), "top1": 100.0 * k / n if n else float("nan")}
                for c, n, k in zip(names, images, correct)]


def logits(output: Any) -> torch.Tensor:
    """A classifier's output as float (N, classes) logits; anything else is a user error:
    a segmenter or saliency model needs its own ``--task``."""
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = (f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
                 else f"a {type(output).__name__}")
        raise UserError(f"the model's output is {shape}, not (N, classes) logits: it is not "
                        "a classifier; pass --task module:object naming the task that scores it")
    return output.float()


BUILT_IN_TASKS = ("classification", "saliency", "segmentation")


def load_task(spec: str | None, config: Any = None) -> Task:
    """The task a ``--task`` string names; None is image classification, reading the
    data as ``config`` (a ``TrainConfig`` or a recorded config dict) asks: layout
    choices, augmentation, a saliency model's ``outputs`` and ``iou_loss``."""
    if spec is None or spec == "classification":
        return ClassificationTask(DataOptions.from_config(config))
    if spec in BUILT_IN_TASKS:
        from .dense import SaliencyTask, SegmentationTask

        if spec == "segmentation":
            return SegmentationTask()
        return SaliencyTask(setting(config, "outputs"), bool(setting(config, "iou_loss")))
    ref, sep, attr = spec.rpartition(":")
    if not sep or not ref or not attr:
        raise TaskError(f"--task {spec!r}: write module:object or path/to/file.py:object")
    from ..io.trust import import_object

    obj = import_object(spec, what="--task", error=TaskError)
    made = isinstance(obj, type) or (callable(obj) and not hasattr(obj, "datasets"))
    task = obj() if made else obj
    missing = [m for m in ("metric_names", "primary_metric", "higher_is_better", "datasets",
                           "loss", "metric_sums") if not hasattr(task, m)]
    if missing:
        raise TaskError(f"--task {spec}: the task lacks {', '.join(missing)} "
                        "(see gct_surgery.train.task)")
    if task.primary_metric not in task.metric_names:
        raise TaskError(f"--task {spec}: primary_metric {task.primary_metric!r} is not in "
                        "metric_names")
    return task
