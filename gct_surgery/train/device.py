"""Putting a batch on the device and running it in the right precision: shared by the
training loop and evaluation."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import UserError


def autocast(device: torch.device, amp: str):
    """bf16 on CPU; fp16 or bf16 on CUDA; a no-op when off."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(x: Any, device: torch.device) -> Any:
    """A tensor, or tensors nested in lists, tuples and dicts, moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def batch_size_of(task: Any, target: Any) -> int:
    """Samples in a batch: the task's ``batch_size(target)`` when it has one, else len."""
    fn = getattr(task, "batch_size", None)
    return int(fn(target)) if callable(fn) else len(target)
