"""Target selection: which convolutions get a gate.

A pure function, ``select_targets(model, spec)``, returns a ``Selection`` that lists
every candidate convolution with the reason it was selected or skipped. The same
selection feeds ``inject``, the ``--dry-run`` plan and ``inspect``.

Patterns are Python regular expressions matched with ``re.search`` against module
names as ``model.named_modules()`` gives them (``layer1.0.conv1``); anchor them
(``^layer4\\.``) when a substring would match too much.

A conv whose input is 1x1 spatially (squeeze-excitation convs, a head conv after
global pooling) is skipped by default: there GCT's l2 embedding sqrt(x^2 + eps) is
just |x|, a gate on the magnitude of each value rather than on a channel's spatial
energy. Only a forward pass can tell: ``with_input_sizes`` runs one at the model's
input size and records those convs in the spec; ``keep_1x1`` gates them anyway.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import NoTargetsError, UserError
from .forward import evaluating, run_with_hooks

# timm convolutions that are not torch ``_ConvNd`` subclasses but still take a
# (N, C, H, W) input: gate them as a unit (MixedConv2d splits its input among child
# convs, which are then not gated separately).
_EXTRA_CONV_CLASS_NAMES = ("CondConv2d", "MixedConv2d")


@dataclass(frozen=True)
class TargetSpec:
    """Which convolutions to gate. The defaults gate every one, as the official code does."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_channels: int = 1
    skip_depthwise: bool = False
    names: tuple[str, ...] | None = None  # exact module names; used to replay a checkpoint
    keep_1x1: bool = False  # gate convs whose input is 1x1 spatially too
    # convs whose input was 1x1 on the dry-run forward (``with_input_sizes``); not recorded
    inputs_1x1: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "inputs_1x1", tuple(self.inputs_1x1))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        for flag, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise UserError(f"bad {flag} pattern {p!r}: {e}") from None

    def to_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude),
                "min_channels": self.min_channels, "skip_depthwise": self.skip_depthwise,
                "keep_1x1": self.keep_1x1}

    def with_input_sizes(self, model: nn.Module, example_input) -> "TargetSpec":
        """This spec with the convs whose input is 1x1 spatially on ``example_input``
        (one forward in eval mode) recorded, so the selection skips them."""
        return replace(self, inputs_1x1=tuple(find_1x1_inputs(model, example_input)))


@dataclass
class Target:
    """One candidate convolution and the verdict on it."""

    name: str
    module: nn.Module
    in_channels: int
    kernel_size: tuple[int, ...]
    groups: int
    spatial_dims: int
    aliases: list[str] = field(default_factory=list)  # other names of a shared (tied) module
    reason: str = "selected"  # or why it was skipped

    @property
    def selected(self) -> bool:
        return self.reason == "selected"

    @property
    def kind(self) -> str:
        cls = type(self.module)
        return getattr(cls, "_gct_base_class", cls).__name__

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def already_gated(self) -> bool:
        return hasattr(self.module, "_gct_base_class")


@dataclass
class Selection:
    targets: list[Target]

    @property
    def selected(self) -> list[Target]:
        return [t for t in self.targets if t.selected]

    @property
    def skipped(self) -> list[Target]:
        return [t for t in self.targets if not t.selected]


def _extra_conv_classes() -> tuple[type, ...]:
    """timm's non-_ConvNd convolutions, looked up only if timm is already imported."""
    if "timm" not in sys.modules:
        return ()
    import timm.layers as layers

    return tuple(getattr(layers, n) for n in _EXTRA_CONV_CLASS_NAMES if hasattr(layers, n))


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, *_extra_conv_classes()))


def _describe(name: str, module: nn.Module) -> Target:
    if isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "kernel_size"):
        ks = module.kernel_size
        ks = tuple(ks) if isinstance(ks, (tuple, list)) else (int(ks),) * 2
        return Target(name, module, int(module.in_channels), ks, int(module.groups), len(ks))
    # MixedConv2d: a ModuleDict of convs, each fed one split of the input channels.
    convs = [m for m in module.children() if isinstance(m, nn.modules.conv._ConvNd)]
    return Target(
        name, module,
        in_channels=sum(c.in_channels for c in convs),
        kernel_size=tuple(c.kernel_size[0] for c in convs),
        groups=sum(c.groups for c in convs),
        spatial_dims=2,
    )


def select_targets(model: nn.Module, spec: TargetSpec = TargetSpec()) -> Selection:
    """List every convolution in ``model`` and decide, for each, whether to gate it.

    Raises ``NoTargetsError`` naming the active filters when nothing is selected.
    """
    targets: dict[int, Target] = {}
    unit_children: set[int] = set()  # convs inside a conv unit (MixedConv2d)
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in targets:
            targets[id(module)].aliases.append(name)
            continue
        if id(module) in unit_children or not is_conv(module) or _is_gate(name):
            continue
        if not isinstance(module, nn.modules.conv._ConvNd):
            unit_children.update(id(m) for m in module.modules() if m is not module)
        targets[id(module)] = _describe(name, module)

    used_excludes: set[str] = set()
    for t in targets.values():
        t.reason = _verdict(t, spec, used_excludes)

    selection = Selection(list(targets.values()))
    if not selection.selected:
        raise NoTargetsError(_no_match_message(selection, spec))
    return selection


def _is_gate(name: str) -> bool:
    return name.endswith(".gate") or name == "gate"


def _verdict(t: Target, spec: TargetSpec, used_excludes: set[str]) -> str:
    names = [t.name, *t.aliases]
    if spec.names is not None:
        return "selected" if t.name in spec.names else "not listed"
    if spec.include and not any(re.search(p, n) for p in spec.include for n in names):
        return "not included"
    for p in spec.exclude:
        if any(re.search(p, n) for n in names):
            used_excludes.add(p)
            return f"excluded by {p!r}"
    if t.in_channels < spec.min_channels:
        return f"fewer than {spec.min_channels} channels"
    if spec.skip_depthwise and t.depthwise:
        return "depthwise"
    if not spec.keep_1x1 and any(n in spec.inputs_1x1 for n in names):
        return "input is 1x1 spatially (the l2 embedding would be |x|; --keep-1x1 gates it)"
    return "selected"


def _no_match_message(selection: Selection, spec: TargetSpec) -> str:
    n = len(selection.targets)
    if n == 0:
        return "the model has no convolution to gate (gct-surgery gates Conv1d/2d/3d inputs)"
    filters = []
    if spec.include:
        filters.append("--include " + " ".join(repr(p) for p in spec.include))
    if spec.exclude:
        filters.append("--exclude " + " ".join(repr(p) for p in spec.exclude))
    if spec.min_channels > 1:
        filters.append(f"--min-channels {spec.min_channels}")
    if spec.skip_depthwise:
        filters.append("--skip-depthwise")
    if spec.names is not None:
        filters.append(f"{len(spec.names)} listed module names")
    if spec.inputs_1x1 and not spec.keep_1x1:
        filters.append("skipping 1x1 inputs (--keep-1x1 keeps them)")
    example = ", ".join(t.name for t in selection.targets[:3])
    return (f"no convolution matched {' '.join(filters) or 'the selection'} "
            f"(the model has {n} convolutions, e.g. {example})")


@torch.no_grad()
def find_1x1_inputs(model: nn.Module, example_input) -> list[str]:
    """Every conv (by each of its names) whose input is 1x1 spatially on
    ``example_input`` at every call: one forward in eval mode, pre-hooks on the convs."""
    seen: dict[int, bool] = {}  # conv -> every input so far was 1x1

    def record(module, args):
        x = args[0] if args else None
        one = isinstance(x, torch.Tensor) and x.ndim >= 3 and all(d == 1 for d in x.shape[2:])
        seen[id(module)] = seen.get(id(module), True) and one

    names: dict[int, list[str]] = {}
    convs: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_conv(module) and not _is_gate(name):
            names.setdefault(id(module), []).append(name)
            convs[id(module)] = module
    run_with_hooks(model, example_input, [m.register_forward_pre_hook(record) for m in convs.values()])
    return [n for i, ok in seen.items() if ok for n in names[i]]


# --- convolutions no module owns ------------------------------------------------------

_CONV_FUNCTIONS = {
    f: f"F.{f.__name__}" for f in (
        torch.conv1d, torch.conv2d, torch.conv3d,
        torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
        nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d,
        nn.functional.conv_transpose1d, nn.functional.conv_transpose2d,
        nn.functional.conv_transpose3d, torch.convolution)
}


class _ConvCallRecorder(TorchFunctionMode):
    """Records every conv function called while no conv module is running."""

    def __init__(self, stack: list[tuple[str, bool]]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: dict[str, None] = {}  # an ordered set

    def __torch_function__(self, func, types, args=(), kwargs=None):
        fn = _CONV_FUNCTIONS.get(func)
        if fn is not None and not any(inside_conv for _, inside_conv in self.stack):
            where = self.stack[-1][0] if self.stack else ""
            self.calls[f"{where or '<model>'} ({fn})"] = None
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def find_functional_convs(model: nn.Module, example_input) -> list[str]:
    """Convolutions called functionally (``F.conv2d(x, w)`` in some forward, not through
    a conv module): surgery cannot gate them, so reports list them. Each entry names the
    module whose forward made the call, e.g. ``'head.fuse (F.conv2d)'``.

    Runs one forward pass in eval mode on ``example_input``.
    """
    stack: list[tuple[str, bool]] = []  # (module name, is a conv) of running forwards

    def enter(name: str, conv: bool):
        return lambda module, args: stack.append((name, conv))

    def leave(module, args, output):
        stack.pop()  # returns None: the output is left alone

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name, is_conv(module))))
        handles.append(module.register_forward_hook(leave))
    recorder = _ConvCallRecorder(stack)
    try:
        with evaluating(model), recorder:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return list(recorder.calls)
