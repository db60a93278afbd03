"""Layer-wise learning-rate decay (timm's ``layer_decay``), composed with a stage's own
parameter groups (``stages.param_groups``) rather than replacing them.

Each parameter's layer comes from timm's own grouping: ``model.group_matcher`` through
``group_with_matcher`` (what ``param_groups_layer_decay`` uses), else timm's
``auto_group_layers``. Of ``L`` layers, layer ``i`` gets ``lr_scale = decay ** (L-1-i)``:
the head keeps the full rate, the stem the smallest. timm's schedulers multiply each
group's ``lr_scale`` into its lr. A gate takes the layer of the conv it gates, so it
moves as fast as the weights it modulates.
"""
from __future__ import annotations

from torch import nn

from ..errors import UserError

GATE_INFIX = ".gate."  # <conv>.gate.{alpha,gamma,beta}: the gate's conv is <conv>


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """``{parameter name: lr_scale}`` for every parameter of ``model``."""
    from timm.models._manipulate import group_with_matcher
    from timm.optim._param_groups import auto_group_layers

    base = [(n, p) for n, p in model.named_parameters() if GATE_INFIX not in f".{n}"]
    if callable(getattr(model, "group_matcher", None)):
        layer_of = group_with_matcher(base, model.group_matcher(coarse=False), reverse=True)
    else:
        layer_of = auto_group_layers(model)
    top = max(layer_of.values(), default=0)
    if top == 0:
        raise UserError(f"--layer-decay: timm finds no layers in {type(model).__name__} (it has no "
                        "group_matcher, as timm models do), so every parameter would get the same "
                        "rate; run without --layer-decay")
    scales = {}
    for name, _ in model.named_parameters():
        conv, infix, _ = f".{name}".rpartition(GATE_INFIX)
        owner = f"{conv[1:]}.weight" if infix else name
        scales[name] = decay ** (top - layer_of.get(owner, top))
    return scales
