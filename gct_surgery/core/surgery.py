"""Key-preserving surgery: put a GCT gate in front of selected convolutions.

A selected conv keeps its identity and its keys: its class is swapped, in place, for
a subclass that owns a ``gate`` child and feeds ``gate(x)`` to the original forward.
``layer1.0.conv1.weight`` stays where it was and the gate adds
``layer1.0.conv1.gate.{alpha,gamma,beta}``. Because the module object is the same,
a conv shared at two places (weight tying) gets one gate, and every reference sees it.
Unlike a forward hook, the gate is a real submodule: visible to torch.fx, exported by
torch.export, ONNX and jit.trace.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import UserError
# is_gate_parameter lives with the gate; callers ask it here, with the rest of surgery
from .gate import GATE_ATTR, GCT, GateConfig, is_gate_parameter  # noqa: F401
from .targets import Selection, TargetSpec, select_targets

class GatedConvMixin:
    """Mixed in front of a conv class: ``forward(x, ...)`` becomes ``conv(gate(x), ...)``."""

    _gct_base_class: type

    def forward(self, x, *args, **kwargs):
        return super().forward(self.gate(x), *args, **kwargs)


class _GateHiddenFromIteration:
    """For a conv that is also a module container (timm's ``MixedConv2d`` is a
    ``ModuleDict`` of per-split convs): its forward iterates its children (``values()``,
    or ``for m in self`` in a ``Sequential``), and must not meet the gate there.
    ``state_dict`` and ``named_modules`` still see the gate."""

    def __iter__(self):  # a ModuleDict iterates names, a ModuleList modules
        gate = self._modules.get(GATE_ATTR)
        return (v for v in super().__iter__() if v is not gate and v != GATE_ATTR)

    def values(self):
        return [v for k, v in self._modules.items() if k != GATE_ATTR]


_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential)


@functools.cache
def gated_class(conv_cls: type) -> type:
    """The gated subclass of ``conv_cls``, created once and registered in this module
    so that pickling and ``copy.deepcopy`` find it by name."""
    name = f"Gated{conv_cls.__name__}"
    while name in globals():
        name += "_"
    hidden = (_GateHiddenFromIteration,) if issubclass(conv_cls, _CONTAINERS) else ()
    cls = globals()[name] = type(name, (GatedConvMixin, *hidden, conv_cls), {
        "_gct_base_class": conv_cls, "__module__": __name__, "__qualname__": name})
    return cls


def gated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every gated conv by its (first) name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedConvMixin)}


def gates(model: nn.Module) -> dict[str, GCT]:
    """Every gate by its conv's name."""
    return {n: getattr(m, GATE_ATTR) for n, m in gated_modules(model).items()}


@dataclass
class InjectionReport:
    gates_added: int
    gates_total: int
    params_added: int
    base_params: int
    trainable_params: int
    gated: list[str]
    selection: Selection = field(repr=False)

    @property
    def params_added_pct(self) -> float:
        return 100.0 * self.params_added / max(self.base_params, 1)

    def to_dict(self) -> dict:
        return {
            "gates_added": self.gates_added,
            "gates_total": self.gates_total,
            "params_added": self.params_added,
            "params_added_pct": round(self.params_added_pct, 4),
            "base_params": self.base_params,
            "trainable_params": self.trainable_params,
            "gated": self.gated,
            "skipped": {t.name: t.reason for t in self.selection.skipped},
            # a conv shared at several places (weight tying) has one gate: its other names
            "tied": {t.name: t.aliases for t in self.selection.selected if t.aliases},
        }


def inject(model: nn.Module, targets: TargetSpec = TargetSpec(),
           gate: GateConfig = GateConfig()) -> InjectionReport:
    """Gate the selected convolutions of ``model`` in place and report what changed.

    Idempotent: a conv that already has a gate keeps it and gets no second one. All
    checks run before the first change, so a failure leaves the model untouched.
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise UserError(f"got a {type(model).__name__}; inject into model.module, then wrap again")
    selection = select_targets(model, targets)
    base_params = base_parameter_count(model)

    new = [t for t in selection.selected if not t.already_gated]
    for t in new:
        conv = t.module
        # the gate on the conv's device, in its dtype (float32 when the weight is not float)
        weight = next(conv.parameters(), torch.empty(0))
        gate_module = GCT(t.in_channels, **asdict(gate), spatial_dims=t.spatial_dims,
                          device=weight.device,
                          dtype=weight.dtype if weight.is_floating_point() else None)
        conv.__class__ = gated_class(type(conv))
        conv.add_module(GATE_ATTR, gate_module)

    gated = list(gated_modules(model))
    return InjectionReport(
        gates_added=len(new),
        gates_total=len(gated),
        params_added=sum(_count(getattr(t.module, GATE_ATTR)) for t in new),
        base_params=base_params,
        trainable_params=trainable_parameter_count(model),
        gated=gated,
        selection=selection,
    )


def remove_gate(conv: nn.Module) -> None:
    """Take the gate off one gated conv: its own class back, its keys as before."""
    delattr(conv, GATE_ATTR)
    conv.__class__ = conv._gct_base_class


def remove(model: nn.Module) -> int:
    """Remove every gate, restoring the original conv classes. Returns how many went."""
    convs = list(gated_modules(model).values())
    for conv in convs:
        remove_gate(conv)
    return len(convs)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without its gates."""
    return _count(model) - sum(_count(g) for g in gates(model).values())
