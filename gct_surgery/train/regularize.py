"""A stage's batch-level regularisers, timm's, set up once per stage: mixup and cutmix
(``timm.data.Mixup``) and label smoothing, as timm's train.py composes them.

Without mixing, smoothing is ``LabelSmoothingCrossEntropy``. With mixup or cutmix the
batch and its targets are mixed and the targets become (N, classes) probabilities, with
the smoothing folded into them (Mixup's ``label_smoothing``); ``ClassificationTask.loss``
scores those with ``SoftTargetCrossEntropy``. Validation always uses the plain loss.

A ``--task`` gets these only when it says its loss takes soft targets
(``soft_targets = True``): mixing a segmenter's masks as class vectors would be wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.heads import model_num_classes
from ..errors import UserError
from .stages import Stage
from .task import ClassificationTask, logits


@dataclass
class Regularizer:
    """What a train step does to a batch (``mix``) and how it scores it (``loss``)."""

    loss: Callable[[Any, Any], torch.Tensor]
    mix: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None

    def __call__(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, Any]:
        return self.mix(x, y) if self.mix is not None else (x, y)


def regularizer_for(stage: Stage, task: Any, model: nn.Module, batch_per_rank: int) -> Regularizer:
    """The stage's regulariser; the task's own loss when every knob is off."""
    mixing = bool(stage.mixup or stage.cutmix)
    if not (mixing or stage.smoothing):
        return Regularizer(task.loss)
    classification = isinstance(task, ClassificationTask)
    if not classification and not getattr(task, "soft_targets", False):
        raise UserError(f"stage {stage.name!r}: --smoothing, --mixup and --cutmix need class "
                        f"targets, and the task {type(task).__name__} does not declare "
                        "soft_targets = True (a loss for (N, classes) probabilities); run "
                        "without them, or add that to the task")
    if classification and not mixing:
        from timm.loss import LabelSmoothingCrossEntropy

        smoothed = LabelSmoothingCrossEntropy(smoothing=stage.smoothing)
        return Regularizer(lambda output, target: smoothed(logits(output), target))
    classes = model_num_classes(model) or len(getattr(task, "class_names", None) or ())
    if not classes:
        raise UserError(f"stage {stage.name!r}: --smoothing/--mixup/--cutmix need the class count, "
                        "and the model has no classifier head timm can read; run without them")
    if not mixing:  # a soft-target task: smoothed one-hot targets
        from timm.data.mixup import mixup_target

        return Regularizer(task.loss, lambda x, y: (x, mixup_target(y, classes, 1.0, stage.smoothing)))
    if batch_per_rank % 2:
        raise UserError(f"stage {stage.name!r}: --mixup/--cutmix pair each image with another, so "
                        f"the batch per process must be even, not {batch_per_rank}; change "
                        "--batch-size")
    from timm.data import Mixup

    return Regularizer(task.loss, Mixup(mixup_alpha=stage.mixup, cutmix_alpha=stage.cutmix,
                                        label_smoothing=stage.smoothing, num_classes=classes))
