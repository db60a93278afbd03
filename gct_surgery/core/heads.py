"""The classifier head of a model: finding it, counting its classes, replacing it.

Model sources (mismatch hints), stages (what a gates stage may train) and tasks (does
the head fit the data) all ask the same questions; the answers live here.
"""
from __future__ import annotations

from torch import nn

from ..errors import UserError


def classifier_name(model: nn.Module) -> str | None:
    """The head's module name: timm's ``get_classifier()``, else the last Linear."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # a model whose get_classifier needs arguments or state
            head = None
        for name, m in model.named_modules():
            if m is head:
                return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    name = classifier_name(model)
    return list(model.get_submodule(name).parameters()) if name else []


def model_num_classes(model: nn.Module) -> int | None:
    """The class count the model predicts: timm's ``num_classes``, else the head's size."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    name = classifier_name(model)
    head = model.get_submodule(name) if name else None
    return getattr(head, "out_features", None)


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A new classifier for ``num_classes``: timm's ``reset_classifier`` when the model
    has one, else the last Linear replaced by a fresh one."""
    if callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(num_classes)
        return
    name = classifier_name(model)
    if name is None:
        raise UserError("--num-classes: the model has no classifier head to replace (no Linear layer)")
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                                    device=old.weight.device, dtype=old.weight.dtype))
