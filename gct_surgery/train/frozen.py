"""A frozen base for the gates stage: the same function, computed more cheaply.

In a gates stage every base tensor is constant, so autograd does work that no
gradient needs. ``frozen_base(model)`` changes, for the duration of the stage, how
convolutions and BatchNorm layers *run*, never what they hold:

- A frozen conv (weight and bias not requiring grad) runs through
  ``_FrozenConvFunction``, which saves nothing for backward: grad_input needs only
  the weight, a constant the function references. Torch's own conv autograd saves
  the conv's input as well, for the weight gradient nobody wants. When the input does
  not require grad either, the conv runs with no autograd at all.
- A frozen BatchNorm (eval mode, affine not training) that is the only consumer of a
  conv's output folds into that conv: the conv runs with the BN-scaled weight and
  shifted bias, and the BN is bypassed (its activation, for timm's BatchNormAct2d,
  still runs). That saves one pass over the activation each way, and the BN's saved
  input. The folded tensors live in a side structure, rebuilt whenever a source
  tensor changes; the state dict keeps its keys and its original tensors.

Which conv feeds which BN is learnt, not guessed from names: before the first
forward in the context, a dry run on the same input (eval mode, no grad, RNG
untouched) goes with hooks and a ``TorchFunctionMode`` that record, for each conv
output, every op that reads it. A pair folds only when the BN's input *is* the conv's
output, nothing else reads that output, and each runs once per forward. At run time
a BN skips itself only for the exact tensor its conv produced folded (a weak
reference), so any other path falls back to the ordinary computation.

Only plain ``nn.Conv1d/2d/3d`` (or their gated subclasses) with zero padding take
the cheap path; timm's Conv2dSame, StdConv, CondConv and MixedConv, other padding
modes and traced or compiled graphs run as usual. On exit every module gets back its
exact class, and nothing of the cheap path remains.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from ..core.gate import is_tracing

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PLAN_ATTR = "_gct_frozen"


def _base_class(module: nn.Module) -> type:
    return getattr(type(module), "_gct_base_class", type(module))


def _norm_classes() -> dict[type, bool]:
    """Foldable norm classes -> whether an activation follows the normalisation."""
    classes = {nn.BatchNorm1d: False, nn.BatchNorm2d: False, nn.BatchNorm3d: False}
    try:
        from timm.layers import BatchNormAct2d

        classes[BatchNormAct2d] = True
    except ImportError:  # timm is a dependency, but the fold does not need it
        pass
    return classes


def _is_frozen(*tensors: torch.Tensor | None) -> bool:
    return not any(t is not None and t.requires_grad for t in tensors)


def norm_is_foldable(bn: nn.Module) -> bool:
    """A BN whose output is an affine function of its input that nothing trains."""
    return (not bn.training and bn.running_mean is not None and bn.running_var is not None
            and _is_frozen(bn.weight, bn.bias))


# --- the conv's plan ------------------------------------------------------------------

@dataclass(eq=False)
class ConvPlan:
    """How one frozen conv runs: its geometry, its BN partner, the folded operands."""

    conv: nn.Module
    dims: int
    bn: nn.Module | None = None
    _folded: tuple | None = None  # (key, weight, bias)
    last_folded_output: weakref.ref | None = None

    def folds(self) -> bool:
        return self.bn is not None and norm_is_foldable(self.bn)

    def operands(self, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        conv = self.conv
        if not fold:
            return conv.weight, conv.bias
        bn = self.bn
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype) if t is not None else None for t in sources)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *_fold(conv, bn))
        return self._folded[1], self._folded[2]

    @property
    def conv_fn(self):
        return (torch.conv1d, torch.conv2d, torch.conv3d)[self.dims - 1]

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = self.conv
        return self.conv_fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then eval-mode BN as one conv: w * s per output channel, (b - mean) * s + beta."""
    w = conv.weight
    var = bn.running_var.double()
    scale = (var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    weight = (w.double() * scale.reshape(-1, *(1,) * (w.dim() - 1))).to(w.dtype)
    return weight.contiguous(memory_format=_memory_format(w)), bias.to(w.dtype)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class _FrozenConvFunction(torch.autograd.Function):
    """A conv with constant weight: backward computes grad_input only, and saves nothing
    (the weight is referenced, not saved: it is a constant of the stage)."""

    @staticmethod
    def forward(ctx, x, plan, weight, bias):
        ctx.plan, ctx.weight, ctx.input_shape, ctx.input_dtype = plan, weight, x.shape, x.dtype
        return plan.run(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dx = input_grad(ctx.plan, ctx.weight, grad, ctx.input_shape)
        return dx.to(ctx.input_dtype), None, None, None


def input_grad(plan: ConvPlan, weight: torch.Tensor, grad: torch.Tensor,
               input_shape: torch.Size) -> torch.Tensor:
    """dL/dinput of ``plan.conv`` run with ``weight``, from dL/doutput alone.

    A 1x1 conv without padding or groups is a matrix product per sample, and so is
    its input gradient (with the weight's transpose, a view: no copy). On CPU that is
    up to 2-3x faster than torch's convolution backward, which also copies a broadcast
    placeholder for the input it does not need. Everything else goes to
    ``aten.convolution_backward``. (A cached flipped weight would also turn 3x3 input
    gradients into forward convs, ~10% faster on CPU, but it costs a copy of every
    weight: more memory than the saved activations at small batches.)
    """
    conv = plan.conv
    kernel = weight.shape[2:]
    if weight.dtype != grad.dtype:  # autocast ran the forward in lower precision
        weight = weight.to(grad.dtype)
    if (conv.groups == 1 and all(k == 1 for k in kernel) and not any(conv.padding)
            and grad.is_contiguous()):
        n, out_ch, in_ch = grad.shape[0], weight.shape[0], weight.shape[1]
        dx = torch.matmul(weight.reshape(out_ch, in_ch).t(), grad.reshape(n, out_ch, -1))
        if all(s == 1 for s in conv.stride):
            return dx.view(input_shape)
        # A strided 1x1 conv reads every s-th position: the others get zero gradient.
        full = grad.new_zeros(input_shape)
        full[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in conv.stride)] = \
            dx.view(n, in_ch, *grad.shape[2:])
        return full
    shape_only = grad.new_empty(1).expand(input_shape)
    return torch.ops.aten.convolution_backward(
        grad, shape_only, weight, None, conv.stride, conv.padding, conv.dilation,
        False, [0] * len(kernel), conv.groups, (True, False, False))[0]


class FrozenConvMixin:
    """Put in front of a plain conv class: ``_conv_forward`` takes the cheap path when
    the conv is frozen and is called with its own weight."""

    def _conv_forward(self, input, weight, bias):
        plan: ConvPlan = self.__dict__[_PLAN_ATTR]
        plan.last_folded_output = None
        if (weight is not self.weight or bias is not self.bias or not _is_frozen(weight, bias)
                or is_tracing(input)):
            return super()._conv_forward(input, weight, bias)
        fold = plan.folds()
        w, b = plan.operands(fold)
        if torch.is_grad_enabled() and input.requires_grad:
            out = _FrozenConvFunction.apply(input, plan, w, b)
        else:
            out = plan.run(input, w, b)
        plan.last_folded_output = weakref.ref(out) if fold else None
        return out


class BypassedNormMixin:
    """Put in front of a BN class: skip the normalisation for the one tensor that its
    conv already produced normalised (folded); anything else is normalised as usual."""

    _gct_has_act: bool = False

    def forward(self, x):
        plan: ConvPlan = self.__dict__[_PLAN_ATTR]
        ref = plan.last_folded_output
        if ref is not None and ref() is x:
            plan.last_folded_output = None
            return self.act(self.drop(x)) if self._gct_has_act else x
        return super().forward(x)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type, **attrs) -> type:
    """``mixin`` in front of ``cls``, created once and registered here (pickle, deepcopy)."""
    if (mixin, cls) not in _SUBCLASSES:
        name = f"{mixin.__name__.replace('Mixin', '')}{cls.__name__}"
        while name in globals():
            name += "_"
        sub = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, **attrs})
        globals()[name] = sub
        _SUBCLASSES[(mixin, cls)] = sub
    return _SUBCLASSES[(mixin, cls)]


# --- finding conv -> BN pairs ---------------------------------------------------------

class _ReadRecorder(TorchFunctionMode):
    """Records, for each conv output, the module stack of every op that reads it."""

    def __init__(self, calibration: "_Calibration") -> None:
        super().__init__()
        self.calibration = calibration

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for t in _tensors(args, kwargs):
            conv = self.calibration.conv_of(t)
            if conv is not None:
                self.calibration.readers.setdefault(conv, []).append(tuple(self.calibration.stack))
        return func(*args, **(kwargs or {}))


def _tensors(args, kwargs) -> Iterator[torch.Tensor]:
    todo = list(args) + list((kwargs or {}).values())
    while todo:
        a = todo.pop()
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            todo.extend(a)


@dataclass
class _Calibration:
    """One forward pass watched: which conv outputs went where."""

    convs: dict[nn.Module, ConvPlan]
    norms: set[nn.Module]
    stack: list[nn.Module] = field(default_factory=list)
    # id(conv output) -> (weak reference to it, conv): a dead output's id may be reused
    outputs: dict[int, tuple[weakref.ref, nn.Module]] = field(default_factory=dict)
    calls: dict[nn.Module, int] = field(default_factory=dict)
    fed_by: dict[nn.Module, nn.Module | None] = field(default_factory=dict)  # bn -> conv
    readers: dict[nn.Module, list[tuple[nn.Module, ...]]] = field(default_factory=dict)
    handles: list = field(default_factory=list)
    mode: _ReadRecorder | None = None

    def start(self, model: nn.Module) -> None:
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave, always_call=True))
        self.mode = _ReadRecorder(self)
        self.mode.__enter__()

    def conv_of(self, t) -> nn.Module | None:
        """The conv that produced tensor ``t`` in this forward, if any."""
        entry = self.outputs.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def _enter(self, module, args):
        self.stack.append(module)
        self.calls[module] = self.calls.get(module, 0) + 1
        if module in self.norms:
            self.fed_by[module] = self.conv_of(args[0]) if args else None

    def _leave(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if module in self.convs and isinstance(output, torch.Tensor):
            self.outputs[id(output)] = (weakref.ref(output), module)

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, bn) pairs that may fold: the BN read the conv's output, nothing else
        read it, and each ran once."""
        found = []
        for bn, conv in self.fed_by.items():
            if conv is None or self.calls.get(conv) != 1 or self.calls.get(bn) != 1:
                continue
            if all(bn in stack for stack in self.readers.get(conv, [])):
                found.append((conv, bn))
        self.outputs.clear()
        return found


# --- the context ----------------------------------------------------------------------

@dataclass
class FrozenBase:
    """What ``frozen_base`` changed, to report and to undo."""

    model: nn.Module
    classes: dict[nn.Module, type] = field(default_factory=dict)  # module -> original class
    plans: dict[nn.Module, ConvPlan] = field(default_factory=dict)
    _calibration: _Calibration | None = None
    _handles: list = field(default_factory=list)

    @property
    def convs(self) -> int:
        """Convolutions that run the cheap path when frozen."""
        return len(self.plans)

    @property
    def folded(self) -> dict[str, str]:
        """conv name -> the BN that folds into it whenever that BN is frozen (eval mode,
        affine not training; checked at every call). Known after the first forward."""
        names = {m: n for n, m in self.model.named_modules()}
        return {names[c]: names[p.bn] for c, p in self.plans.items() if p.bn is not None}

    def activate(self) -> "FrozenBase":
        for module in self.model.modules():
            if (_base_class(module) in _PLAIN_CONVS and not isinstance(module, FrozenConvMixin)
                    and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
                plan = ConvPlan(module, module.weight.dim() - 2)
                self._swap(module, FrozenConvMixin, plan)
                self.plans[module] = plan
        norms = _norm_classes()
        candidates = {m for m in self.model.modules() if type(m) in norms}
        if self.plans and candidates:  # learn the conv -> BN pairs before the first forward
            self._calibration = _Calibration(self.plans, candidates)
            self._handles = [self.model.register_forward_pre_hook(self._calibrate, with_kwargs=True)]
        return self

    def _swap(self, module: nn.Module, mixin: type, plan: ConvPlan, **attrs) -> None:
        self.classes[module] = type(module)
        module.__dict__[_PLAN_ATTR] = plan
        module.__class__ = _subclass(mixin, type(module), **attrs)

    def _calibrate(self, module, args, kwargs):
        """Before the first forward: one watched dry run on the same input, in eval mode,
        without grad, RNG untouched. Every real forward then takes the same (folded)
        path, so a run resumed mid-stage reproduces the uninterrupted one bit for bit."""
        calibration = self._calibration
        if calibration is None or calibration.mode is not None:
            return  # done, or this is the dry run itself
        calibration = self._calibration = _Calibration(self.plans, calibration.norms)  # fresh
        modes = {m: m.training for m in self.model.modules()}
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.model.eval()
                calibration.start(self.model)
                self.model(*args, **kwargs)
        finally:
            calibration.stop()
            for m, training in modes.items():
                m.training = training
        norms = _norm_classes()
        for conv, bn in calibration.pairs():
            plan = self.plans[conv]
            plan.bn = bn
            self._swap(bn, BypassedNormMixin, plan, _gct_has_act=norms[type(bn)])
        self._calibration = None
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def restore(self) -> None:
        """Every module back to its exact class; nothing of the cheap path remains."""
        if self._calibration is not None:
            self._calibration.stop()
            self._calibration = None
        self._remove_hooks()
        for module, cls in self.classes.items():
            module.__class__ = cls
            module.__dict__.pop(_PLAN_ATTR, None)
        self.classes.clear()
        self.plans.clear()


@contextmanager
def frozen_base(model: nn.Module) -> Iterator[FrozenBase]:
    """Run ``model``'s frozen convs and BNs the cheap way inside the block; restore after.

    Use on the unwrapped model (before DDP wraps it, or on ``ddp.module``). Modules
    that train (``requires_grad``) or BN layers in train mode keep the ordinary path,
    checked at every call, so the context is safe in any stage, useful in gates stages.
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    state = FrozenBase(model).activate()
    try:
        yield state
    finally:
        state.restore()
