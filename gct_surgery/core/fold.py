"""What training did to the gates: how far they moved from identity, and folding the
ones that became constant into the convolution they feed.

A gate starts at alpha = 1, gamma = beta = 0, where it is exactly the identity. Its
value is 1 + tanh(gamma * normalised_embedding + beta), and the normalised embedding is
about 1 in size, so max(|gamma|, |beta|) bounds how far a gate can scale a channel:
0.1 means by about 10%. Below ``ACTIVE`` the gates are "barely moved": the model is
practically the one before injection, whatever the training loss did. Training reports
it after every stage; ``inspect`` gives it as its verdict.

A gate whose gamma is 0 ignores its input: gate = 1 + tanh(beta), a fixed scale per
input channel. Scaling a conv's input channel c by s_c is the same as scaling the
weight slice that reads channel c, so the gate folds into the weight and goes away.
(``torch.nn.utils.fusion.fuse_conv_bn_weights`` folds a BatchNorm *after* a conv: a
scale per output channel plus a bias shift. A gate scales the *input*, per group, and
leaves the bias alone, so that call does not express it.)

- Grouped and depthwise convs: weight[o, j] reads input channel
  group(o) * in_per_group + j, so the scale is reshaped per group.
- Transposed convs keep the input channel on weight axis 0.
- Padding needs nothing: a padded value is 0 or a copy of a scaled value.
- timm's CondConv2d mixes expert weights linearly, so each expert is scaled alike;
  MixedConv2d splits its input among child convs, each folded with its slice.
- Weight-standardised convs (StdConv2d and kin) renormalise the weight in forward,
  which would undo the scale: their gates are refused and kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .surgery import gated_modules, gates, remove_gate

ACTIVE = 0.1                           # max(|gamma|, |beta|) at or above it: the gates act
FOLD_TOLERANCES = (1e-6, 1e-3, 1e-2)   # max |gamma| a gate may have to fold into its conv


# --- movement ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GateMovement:
    gates: int
    max_abs_gamma: float
    max_abs_beta: float
    max_abs_alpha_shift: float   # max |alpha - 1|
    active_gates: int            # gates with max(|gamma|, |beta|) >= ACTIVE

    @property
    def state(self) -> str:
        """'no gates', 'identity', 'barely moved' or 'active'."""
        if not self.gates:
            return "no gates"
        if self.max_abs_gamma == 0 and self.max_abs_beta == 0:
            return "identity"
        return "active" if max(self.max_abs_gamma, self.max_abs_beta) >= ACTIVE else "barely moved"

    def to_dict(self) -> dict:
        return {**asdict(self), "state": self.state}


def gate_movement(model: nn.Module) -> GateMovement:
    """The largest departures from identity over every gate of ``model``."""
    def largest(t: torch.Tensor) -> float:
        return t.detach().abs().max().item()

    found = list(gates(model).values())
    gamma = [largest(g.gamma) for g in found]
    beta = [largest(g.beta) for g in found]
    return GateMovement(len(found), max(gamma, default=0.0), max(beta, default=0.0),
                        max((largest(g.alpha - 1) for g in found), default=0.0),
                        sum(max(g, b) >= ACTIVE for g, b in zip(gamma, beta)))


def foldable(model: nn.Module, tolerances: tuple[float, ...] = FOLD_TOLERANCES) -> dict[float, int]:
    """How many gates ``export --fold`` would fold at each tolerance on max |gamma|."""
    convs = list(gated_modules(model).values())
    return {tol: sum(refusal(conv, tol) is None for conv in convs) for tol in tolerances}


# --- folding ----------------------------------------------------------------------------

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
    """Why the gate of gated ``conv`` cannot fold, or None when it can."""
    base = type(conv)._gct_base_class
    gamma = conv.gate.gamma.detach()
    worst = gamma.abs().max().item() if gamma.numel() else 0.0
    if worst > tol:
        return f"gamma is not ~0 (max |gamma| {worst:.3g} > {tol:g}): the gate depends on its input"
    if _is_weight_standardised(base):
        return f"{base.__name__} standardises its weight in forward, so folding is not exact"
    if not _scalable(conv):
        return f"{base.__name__} has no weight layout this tool knows how to fold into"
    return None


def _scalable(conv: nn.Module) -> bool:
    # a torch conv or CondConv2d is; a MixedConv2d (its ``values()`` skip the gate) when
    # every part is
    parts = conv.values() if hasattr(conv, "splits") else []
    return all(isinstance(c, _ConvNd) and not _is_weight_standardised(type(c)) for c in parts)


@torch.no_grad()
def scale_input_channels(conv: nn.Module, scale: torch.Tensor) -> None:
    """Multiply ``conv``'s weight so that ``conv(x)`` becomes ``conv(x * scale[c])``."""
    if hasattr(conv, "splits"):  # MixedConv2d
        for child, part in zip(conv.values(), torch.split(scale, list(conv.splits))):
            scale_input_channels(child, part)
        return
    w = conv.weight
    if isinstance(conv, _ConvNd) and conv.transposed:  # (in, out/groups, k...): in on axis 0
        w.copy_((w.float() * scale.view(-1, *[1] * (w.dim() - 1))).to(w.dtype))
        return
    # a conv's weight is (out, in/groups, k...); CondConv2d's (experts, prod(weight_shape))
    lead = () if isinstance(conv, _ConvNd) else (conv.num_experts,)
    out, per_group, *kernel = w.shape if isinstance(conv, _ConvNd) else conv.weight_shape
    groups = conv.groups
    grouped = w.float().view(*lead, groups, out // groups, per_group, *kernel)
    factor = scale.float().view(*[1] * len(lead), groups, 1, per_group, *[1] * len(kernel))
    w.copy_((grouped * factor).reshape(w.shape).to(w.dtype))


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
        # gamma = 0: the gate is 1 + tanh(beta), computed in float32 as the gate does
        scale_input_channels(conv, 1.0 + torch.tanh(conv.gate.beta.detach().float()).reshape(-1))
        remove_gate(conv)
        report.folded.append(name)
    return report
