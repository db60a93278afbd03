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

import logging
from dataclasses import dataclass, field

from torch import nn

from ..errors import UserError
from .gate import GCT, GateConfig
from .targets import Selection, TargetSpec, select_targets

_logger = logging.getLogger(__name__)

GATE_ATTR = "gate"


class GatedConvMixin:
    """Mixed in front of a conv class: ``forward(x, ...)`` becomes ``conv(gate(x), ...)``."""

    _gct_base_class: type

    def forward(self, x, *args, **kwargs):
        return super().forward(self.gate(x), *args, **kwargs)


class _GateHiddenFromIteration:
    """For a conv that is also a module container (timm's ``MixedConv2d`` is a
    ``ModuleDict`` of per-split convs): its forward iterates its children, and must
    not meet the gate there. ``state_dict`` and ``named_modules`` still see the gate."""

    def __iter__(self):
        gate = self._modules.get(GATE_ATTR)
        return (v for v in super().__iter__()
                if v is not gate and not (isinstance(v, str) and v == GATE_ATTR))

    def __len__(self) -> int:
        return super().__len__() - (GATE_ATTR in self._modules)

    def keys(self):
        return [k for k in super().keys() if k != GATE_ATTR]

    def items(self):
        return [(k, v) for k, v in super().items() if k != GATE_ATTR]

    def values(self):
        return [v for _, v in self.items()]


_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential)
_GATED_CLASSES: dict[type, type] = {}


def gated_class(conv_cls: type) -> type:
    """The gated subclass of ``conv_cls``, created once and registered in this module
    so that pickling and ``copy.deepcopy`` find it by name."""
    if conv_cls in _GATED_CLASSES:
        return _GATED_CLASSES[conv_cls]
    name = f"Gated{conv_cls.__name__}"
    while name in globals():
        name += "_"
    bases = (GatedConvMixin, conv_cls)
    if issubclass(conv_cls, _CONTAINERS):
        bases = (GatedConvMixin, _GateHiddenFromIteration, conv_cls)
    cls = type(name, bases, {"_gct_base_class": conv_cls, "__module__": __name__,
                             "__qualname__": name})
    globals()[name] = cls
    _GATED_CLASSES[conv_cls] = cls
    return cls


def is_gated(module: nn.Module) -> bool:
    return isinstance(module, GatedConvMixin)


def gated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every gated conv by its (first) name, in module order."""
    return {n: m for n, m in model.named_modules() if is_gated(m)}


def gates(model: nn.Module) -> dict[str, GCT]:
    """Every gate by its conv's name."""
    return {n: getattr(m, GATE_ATTR) for n, m in gated_modules(model).items()}


def is_gate_parameter(name: str) -> bool:
    """True for a state-dict key or parameter name that belongs to a gate."""
    return f".{GATE_ATTR}." in f".{name}"


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


def _check_not_wrapped(model: nn.Module) -> None:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrappers):
        raise UserError(f"got a {type(model).__name__}; inject into model.module, then wrap again")


def inject(model: nn.Module, targets: TargetSpec = TargetSpec(),
           gate: GateConfig = GateConfig()) -> InjectionReport:
    """Gate the selected convolutions of ``model`` in place and report what changed.

    Idempotent: a conv that already has a gate keeps it and gets no second one. All
    checks run before the first change, so a failure leaves the model untouched.
    """
    _check_not_wrapped(model)
    selection = select_targets(model, targets)
    n_params_before = _count(model)
    base_params = n_params_before - _count_gates(model)

    added = 0
    for t in selection.selected:
        if t.already_gated:
            continue
        conv = t.module
        weight = next(conv.parameters(), None)
        device = weight.device if weight is not None else None
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        gate_module = gate.build(t.in_channels, t.spatial_dims, device=device, dtype=dtype)
        conv.__class__ = gated_class(type(conv))
        conv.add_module(GATE_ATTR, gate_module)
        added += 1

    if added == 0:
        _logger.info("every selected convolution already has a gate; nothing added")
    gated = list(gated_modules(model))
    return InjectionReport(
        gates_added=added,
        gates_total=len(gated),
        params_added=_count(model) - n_params_before,
        base_params=base_params,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        gated=gated,
        selection=selection,
    )


def remove(model: nn.Module) -> int:
    """Remove every gate, restoring the original conv classes. Returns how many went."""
    removed = 0
    for conv in list(gated_modules(model).values()):
        delattr(conv, GATE_ATTR)
        conv.__class__ = conv._gct_base_class
        removed += 1
    return removed


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_gates(model: nn.Module) -> int:
    return sum(p.numel() for g in gates(model).values() for p in g.parameters())


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without its gates."""
    return _count(model) - _count_gates(model)
