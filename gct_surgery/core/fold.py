"""Fold constant gates into the convolution they feed.

A gate whose gamma is 0 ignores its input: gate = 1 + tanh(beta), a fixed scale per
input channel. Scaling a conv's input channel c by s_c is the same as scaling the
weight slice that reads channel c, so the gate folds into the weight and goes away.

- Grouped and depthwise convs: weight[o, j] reads input channel
  group(o) * in_per_group + j, so the scale is reshaped per group.
- Transposed convs keep the input channel on weight axis 0.
- Bias is untouched (the scale acts on the input side), and so is padding: a padded
  value is 0 or a copy of a scaled value, either way already scaled.
- timm's CondConv2d mixes expert weights linearly, so each expert is scaled alike;
  MixedConv2d splits its input among child convs, each folded with its slice.
- Weight-standardised convs (StdConv2d and kin) renormalise the weight in forward,
  which would undo the scale: their gates are refused and kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .surgery import GATE_ATTR, gated_modules


@dataclass
class FoldReport:
    """Which gates folded, which stayed and why."""

    folded: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> reason

    def to_dict(self) -> dict:
        return {"folded": len(self.folded), "kept": len(self.kept),
                "folded_modules": self.folded, "kept_modules": self.kept}


def _is_weight_standardised(conv_cls: type) -> bool:
    return any("Std" in c.__name__ for c in conv_cls.__mro__)


def refusal(conv: nn.Module, tol: float) -> str | None:
    """Why the gate of ``conv`` cannot fold, or None when it can."""
    base = getattr(type(conv), "_gct_base_class", type(conv))
    gamma = getattr(conv, GATE_ATTR).gamma
    worst = gamma.detach().abs().max().item() if gamma.numel() else 0.0
    if worst > tol:
        return f"gamma is not ~0 (max |gamma| {worst:.3g} > {tol:g}): the gate depends on its input"
    if _is_weight_standardised(base):
        return f"{base.__name__} standardises its weight in forward, so folding is not exact"
    if not _scalable(conv):
        return f"{base.__name__} has no weight layout this tool knows how to fold into"
    return None


def _scalable(conv: nn.Module) -> bool:
    if isinstance(conv, nn.modules.conv._ConvNd):
        return True
    if hasattr(conv, "weight_shape") and hasattr(conv, "num_experts"):  # CondConv2d
        return True
    if hasattr(conv, "splits"):  # MixedConv2d: every part must be foldable
        parts = [c for n, c in conv.named_children() if n != GATE_ATTR]
        return all(isinstance(c, nn.modules.conv._ConvNd) and not _is_weight_standardised(type(c))
                   for c in parts)
    return False


@torch.no_grad()
def scale_input_channels(conv: nn.Module, scale: torch.Tensor) -> None:
    """Multiply ``conv``'s weight so that ``conv(x)`` becomes ``conv(x * scale[c])``."""
    if hasattr(conv, "splits") and not isinstance(conv, nn.modules.conv._ConvNd):  # MixedConv2d
        children = [c for name, c in conv.named_children() if name != GATE_ATTR]
        for child, part in zip(children, torch.split(scale, list(conv.splits))):
            scale_input_channels(child, part)
        return
    w = conv.weight
    if isinstance(conv, nn.modules.conv._ConvNd) and conv.transposed:
        # (in, out/groups, k...): the input channel is axis 0.
        factor = scale.view(-1, *([1] * (w.dim() - 1)))
        w.copy_((w.float() * factor).to(w.dtype))
        return
    if isinstance(conv, nn.modules.conv._ConvNd):
        shape, lead = tuple(w.shape), ()
    else:  # CondConv2d: (experts, prod(weight_shape))
        shape, lead = tuple(conv.weight_shape), (conv.num_experts,)
    out, per_group, kernel = shape[0], shape[1], shape[2:]
    groups = conv.groups
    grouped = w.float().view(*lead, groups, out // groups, per_group, *kernel)
    factor = scale.float().view(*([1] * len(lead)), groups, 1, per_group, *([1] * len(kernel)))
    w.copy_((grouped * factor).reshape(w.shape).to(w.dtype))


def constant_scale(gate: nn.Module) -> torch.Tensor:
    """The per-channel value of a gate with gamma = 0, computed as the gate does
    (in float32): 1 + tanh(beta)."""
    return (1.0 + torch.tanh(gate.beta.detach().float())).reshape(-1)


def fold_gates(model: nn.Module, tol: float = 1e-6) -> FoldReport:
    """Fold every gate with max |gamma| <= ``tol`` into its conv, in place.

    The folded conv gets its original class back and loses its ``gate`` child; the
    other gates stay, each with the reason in the report.
    """
    report = FoldReport()
    for name, conv in gated_modules(model).items():
        why = refusal(conv, tol)
        if why:
            report.kept[name] = why
            continue
        scale_input_channels(conv, constant_scale(getattr(conv, GATE_ATTR)))
        delattr(conv, GATE_ATTR)
        conv.__class__ = conv._gct_base_class
        report.folded.append(name)
    return report
