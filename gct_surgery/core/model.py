"""What the tool asks of a whole model: run it once for a check, and find its head.

Surgery, export, target discovery, inspect and evaluation all need "put the model in
eval mode, run it, put it back as it was" (``evaluating``). Model sources (mismatch
hints), stages (what a gates stage may train) and tasks (does the head fit the data)
all ask where the classifier is and how many classes it predicts.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten_with_path, tree_leaves

from ..errors import UserError


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
    """Every tensor in a model's output (a tensor, or tuples, lists and dicts of them)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_names(out: Any) -> list[str]:
    """A name for each tensor of a model's output, in ``flat_outputs`` order: ``output``
    for a tensor; a dict's keys (torchvision's ``out``, ``aux``); else ``output0``,
    ``output1``... (U^2-Net's fused map first, then its side outputs)."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    leaves = [(path, v) for path, v in tree_flatten_with_path(out)[0]
              if isinstance(v, torch.Tensor)]
    names = ["_".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path)
             for path, _ in leaves]
    return [n if n[:1].isalpha() else f"output{n}" for n in names]


def run_model(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs on ``x`` in eval mode, as a flat list of tensors."""
    return flat_outputs(run_with_hooks(model, x, []))


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| over every output tensor; inf if the structures differ."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()]
    return max(diffs, default=0.0)


def example_input(input_size: list[int] | None, batch: int = 2) -> torch.Tensor:
    """A seeded random batch of ``input_size`` (C, *spatial), for verification."""
    return torch.randn(batch, *(input_size or [3, 224, 224]),
                       generator=torch.Generator().manual_seed(0))


# --- the classifier head ---------------------------------------------------------------

def classifier_name(model: nn.Module) -> str | None:
    """The head's module name: timm's ``get_classifier()``, else the last Linear."""
    head = None
    with contextlib.suppress(Exception):  # none, or one that needs arguments or state
        head = model.get_classifier()
    for name, m in model.named_modules():
        if m is head:
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    name = classifier_name(model)
    return list(model.get_submodule(name).parameters()) if name else []


# torchvision's segmentation heads end in convs: FCN and DeepLabV3 (and their aux head)
# in one, LRASPP in two
DENSE_HEADS = ("classifier.4", "aux_classifier.4", "classifier.low_classifier",
               "classifier.high_classifier")


def dense_heads(model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in DENSE_HEADS if isinstance(modules.get(n), nn.Conv2d)]


def head_name(model: nn.Module) -> str | None:
    """Where the class scores come from: the classifier, else the first dense head conv."""
    return classifier_name(model) or next(iter(dense_heads(model)), None)


def model_num_classes(model: nn.Module) -> int | None:
    """The class count the model predicts: timm's ``num_classes``, else the head's size."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    name = head_name(model)
    head = model.get_submodule(name) if name else None
    return getattr(head, "out_features", getattr(head, "out_channels", None))


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A new classifier for ``num_classes``: timm's ``reset_classifier`` when the model
    has one, else the last Linear replaced by a fresh one; a torchvision segmentation
    model's head convs (aux and LRASPP's two included) get fresh output rows."""
    if callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(num_classes)
        return
    for name in dense_heads(model):  # new output rows; a gate in front of the conv stays
        old = model.get_submodule(name)
        fresh = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, bias=old.bias is not None,
                          device=old.weight.device, dtype=old.weight.dtype)
        old.weight, old.bias, old.out_channels = fresh.weight, fresh.bias, num_classes
    name = classifier_name(model)
    if name is None and dense_heads(model):
        return
    if name is None:
        raise UserError("--num-classes: the model has no classifier head to replace "
                        "(no Linear layer, no segmentation head)")
    old = model.get_submodule(name)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                                        device=old.weight.device, dtype=old.weight.dtype))
