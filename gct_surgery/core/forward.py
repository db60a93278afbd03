"""Running a model for a check: eval mode for one forward, every output tensor, and the
largest difference between two runs.

Surgery, export, target discovery, inspect and evaluation all need "put the model in
eval mode, run it, put it back as it was"; ``evaluating`` is that, written once.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; the model's own train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def run_with_hooks(model: nn.Module, x: Any, handles: list) -> Any:
    """One forward in eval mode while ``handles`` (hooks just registered) record what
    they watch; the hooks are removed afterwards, whatever happens."""
    try:
        with evaluating(model):
            return model(x)
    finally:
        for h in handles:
            h.remove()


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, tuple, list or dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    return []


@torch.no_grad()
def run_model(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs on ``x`` in eval mode, as a flat list of tensors."""
    with evaluating(model):
        return flat_outputs(model(x))


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| over every output tensor; inf if the structures differ."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()]
    return max(diffs, default=0.0)


def example_input(input_size: list[int] | None, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded random batch of ``input_size`` (C, *spatial), for verification."""
    size = input_size or [3, 224, 224]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *size, generator=g)
