"""The benchmark's own helper: folding a gate into the next conv's weight at inference.

Not part of the package: ``bench_inference.py`` installs it in place of the gated
conv's forward to measure what folding would buy at batch size 1 (docs/performance.md).
"""
from __future__ import annotations

import torch
from torch import nn

from gct_surgery.core.gate import GCT, is_tracing


_FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def gated_conv_operands(gate: GCT, conv: nn.Module, x: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Operands for a gated conv's forward: ``(input, weight)``.

    ``weight is None`` means "run the conv as usual on ``input``", which is then
    ``gate(x)``. Otherwise ``conv._conv_forward(input, weight, conv.bias)`` equals the
    conv applied to ``gate(x)``: at inference, for a batch of one, when the conv's
    weight has fewer elements than the activation, the per-input-channel gate folds
    into the weight (along its input-channel axis, per group for grouped convs; any
    padding mode commutes with a per-channel scale). That trades the pass over the
    activation for a pass over the smaller weight. Equal up to rounding, and exactly
    at init (gate 1).

    Only for plain ``nn.Conv1d/2d/3d`` (or their gated subclasses), whose forward is
    ``_conv_forward(input, self.weight, self.bias)``; never while tracing/exporting or
    when anything needs a gradient.
    """
    if is_tracing(x):
        return gate(x), None
    weight = getattr(conv, "weight", None)
    base = getattr(type(conv), "_gct_base_class", type(conv))
    if (
        gate.impl != "fast"
        or base not in _FOLDABLE_CONVS
        or not isinstance(weight, torch.Tensor)
        or x.dim() != weight.dim()
        or x.shape[0] != 1
        or weight.numel() >= x[0].numel()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or any(p.requires_grad for p in gate.parameters())))
    ):
        return gate(x), None
    groups = conv.groups
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    g = gate.gate_values(x).to(weight.dtype)  # (1, C)
    g = g.reshape(groups, 1, in_per_group, *(1,) * (weight.dim() - 2))
    w = weight.reshape(groups, out_ch // groups, *weight.shape[1:]) * g
    return x, w.reshape(weight.shape)
