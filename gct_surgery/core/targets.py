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
energy. Only a forward pass can tell: ``watch_convs`` runs one at the model's input
size (it also finds convolutions called as functions, which no surgery can gate) and
``TargetSpec.inputs_1x1`` records those convs; ``keep_1x1`` gates them anyway.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import NoTargetsError, UserError
from .gate import is_gate_parameter
from .model import flat_outputs, run_with_hooks

@dataclass(frozen=True)
class TargetSpec:
    """Which convolutions to gate. The defaults gate every one, as the official code does."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_channels: int = 1
    skip_depthwise: bool = False
    names: tuple[str, ...] | None = None  # exact module names; used to replay a checkpoint
    keep_1x1: bool = False  # gate convs whose input is 1x1 spatially too
    # convs whose input was 1x1 on the dry-run forward (``watch_convs``); not recorded
    inputs_1x1: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("include", "exclude", "inputs_1x1", "names"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(getattr(self, key)))
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
        return getattr(self.module, "_gct_base_class", type(self.module)).__name__

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
    """timm convolutions that are not torch ``_ConvNd`` subclasses but still take a
    (N, C, H, W) input, gated as a unit (MixedConv2d splits its input among child convs,
    which are then not gated separately); looked up only if timm is already imported."""
    if "timm" not in sys.modules:
        return ()
    import timm.layers as layers

    return tuple(getattr(layers, n) for n in ("CondConv2d", "MixedConv2d") if hasattr(layers, n))


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, *_extra_conv_classes()))


def _describe(name: str, module: nn.Module) -> Target:
    if isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "kernel_size"):
        ks = tuple(module.kernel_size)  # a tuple in torch's convs and timm's CondConv2d
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
        # a conv whose weights would pass for a gate's (one named ``gate``) is never gated
        if (id(module) in unit_children or not is_conv(module)
                or is_gate_parameter(f"{name}.weight")):
            continue
        if not isinstance(module, nn.modules.conv._ConvNd):
            unit_children.update(id(m) for m in module.modules() if m is not module)
        targets[id(module)] = _describe(name, module)

    for t in targets.values():
        t.reason = _verdict(t, spec)

    selection = Selection(list(targets.values()))
    if not selection.selected:
        raise NoTargetsError(_no_match_message(selection, spec))
    return selection


def _verdict(t: Target, spec: TargetSpec) -> str:
    names = [t.name, *t.aliases]
    if spec.names is not None:
        return "selected" if t.name in spec.names else "not listed"
    if spec.include and not any(re.search(p, n) for p in spec.include for n in names):
        return "not included"
    for p in spec.exclude:
        if any(re.search(p, n) for n in names):
            return f"excluded by {p!r}"
    if t.in_channels < spec.min_channels:
        return f"fewer than {spec.min_channels} channels"
    if spec.skip_depthwise and 1 < t.groups == t.in_channels:
        return "depthwise"
    if not spec.keep_1x1 and any(n in spec.inputs_1x1 for n in names):
        return "input is 1x1 spatially (the l2 embedding would be |x|; --keep-1x1 gates it)"
    return "selected"


def _no_match_message(selection: Selection, spec: TargetSpec) -> str:
    n = len(selection.targets)
    if n == 0:
        return "the model has no convolution to gate (gct-surgery gates Conv1d/2d/3d inputs)"
    filters = [text for active, text in (
        (spec.include, "--include " + " ".join(map(repr, spec.include))),
        (spec.exclude, "--exclude " + " ".join(map(repr, spec.exclude))),
        (spec.min_channels > 1, f"--min-channels {spec.min_channels}"),
        (spec.skip_depthwise, "--skip-depthwise"),
        (spec.names is not None, f"{len(spec.names or ())} listed module names"),
        (spec.inputs_1x1 and not spec.keep_1x1, "skipping 1x1 inputs (--keep-1x1 keeps them)"),
    ) if active]
    example = ", ".join(t.name for t in selection.targets[:3])
    return (f"no convolution matched {' '.join(filters) or 'the selection'} "
            f"(the model has {n} convolutions, e.g. {example})")


# --- convolutions no module owns ------------------------------------------------------

# F.conv2d and the rest are these very objects
_CONV_FUNCTIONS = {f: f"F.{f.__name__}" for f in (
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, torch.convolution)}


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


@dataclass
class ConvCalls:
    """What one forward pass shows about a model's convolutions."""

    inputs_1x1: list[str]  # every name of a conv whose input was 1x1 spatially at each call
    functional: list[str]  # convs called as functions, e.g. 'head.fuse (F.conv2d)'
    outputs: list = field(default_factory=list)  # the model's outputs on that pass, flat


@torch.no_grad()
def watch_convs(model: nn.Module, example_input) -> ConvCalls:
    """One forward in eval mode on ``example_input`` with hooks on every module: which
    convs see only 1x1 inputs, and which convolutions run as functions (``F.conv2d(x, w)``
    in some forward, not through a conv module), which surgery cannot gate; each of
    those names the module whose forward made the call."""
    running: list[tuple[str, bool]] = []  # (module name, is a conv) of the forwards running
    all_1x1: dict[nn.Module, bool] = {}  # conv -> every input so far was 1x1

    def enter(name: str, conv: bool):
        def hook(module, args):
            running.append((name, conv))
            if conv:
                x = args[0] if args else None
                one = isinstance(x, torch.Tensor) and x.ndim >= 3 and set(x.shape[2:]) == {1}
                all_1x1[module] = all_1x1.get(module, True) and one
        return hook

    def leave(module, args, output):
        running.pop()  # returns None: the output is left alone

    handles = [h for name, module in model.named_modules()
               for h in (module.register_forward_pre_hook(enter(name, is_conv(module))),
                         module.register_forward_hook(leave))]
    with _ConvCallRecorder(running) as recorder:
        outputs = flat_outputs(run_with_hooks(model, example_input, handles))
    return ConvCalls([n for n, m in model.named_modules(remove_duplicate=False) if all_1x1.get(m)],
                     list(recorder.calls), outputs)
