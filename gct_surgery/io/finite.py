"""Non-finite weights, found where they are: the file and the first tensor holding a
NaN or inf. ``export``, ``eval`` and ``finetune`` refuse such a checkpoint up front,
so the fault is named as the file's, not blamed on the export, turned into NaN
metrics, or reported as a learning rate too high at the first step."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError


def first_nonfinite(tensors) -> tuple[str, str] | None:
    """``(name, what)`` of the first of ``(name, tensor)`` pairs holding a NaN or inf:
    ``what`` says which and how many, e.g. ``"12 NaN of 4,608 values"``."""
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            inf = t.numel() - nan - int(torch.isfinite(t).sum())
            parts = [f"{nan:,} NaN" if nan else "", f"{inf:,} inf" if inf else ""]
            return name, f"{' and '.join(p for p in parts if p)} of {t.numel():,} values"
    return None


def refuse_nonfinite(tensors, source: str | Path, action: str) -> None:
    """Refuse a checkpoint (a model, or ``(name, tensor)`` pairs) that holds NaN or inf,
    naming the file and the first such tensor: the fault is the file's, not the
    export's or the learning rate's."""
    if isinstance(tensors, nn.Module):
        tensors = itertools.chain(tensors.named_parameters(), tensors.named_buffers())
    found = first_nonfinite(tensors)
    if found is not None:
        name, what = found
        raise CheckpointError(
            f"{source} holds non-finite weights (first: {name}, {what}), so it cannot be "
            f"{action}; use an earlier checkpoint, e.g. a run folder's best.safetensors or one "
            "saved before the weights diverged")

