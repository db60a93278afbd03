"""Stages as data, and what a stage does to a model: which parameters train, whether
BatchNorm statistics are frozen, the optimizer's parameter groups, the batch regulariser.

Three kinds of stage, after the protocols practitioners use on pretrained models:

``gates``
    Only the gate parameters train; every other tensor, BatchNorm running statistics
    included, stays bit-identical. BN is kept in eval mode even though ``model.train()``
    runs each epoch (``requires_grad=False`` alone does not stop running statistics from
    drifting). Options: train the classifier head (needed when it was replaced for a new
    class count) and the BN affine parameters.
``head``
    Only the classifier head trains ("linear probe"), BN statistics frozen as in a gates
    stage: head-then-full is the control that separates the protocol's effect from the
    gates'. ``train_bn`` adds the BN affine parameters.
``full``
    Everything trains; the base at a lower learning rate than the gates
    (``Stage.effective_base_lr``).

Parameters the user froze (``requires_grad=False`` when the first stage starts, e.g. a
BatchNorm bias fixed at zero) stay frozen in every stage, ``full`` included, and so do
parameters matching the stage's ``keep_frozen`` patterns.

Weight decay: gate ``beta`` never decays (the official code: "not to apply weight decay on
the gating bias"); ``alpha`` and ``gamma`` use ``gate_weight_decay``. timm's optimizer
factory would decay them (it exempts only tensors of one dimension or fewer, and gate
tensors are (1, C, 1, 1)), so the groups are built here and handed to
``create_optimizer_v2`` through its ``param_group_fn``.

A researcher's own loop uses the same rules through ``freeze_base`` (the gates stage),
``unfreeze`` (the full stage) and ``param_groups`` (for any torch optimizer), exported by
the package (README, "Your own training loop").
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from timm.data.mixup import Mixup, mixup_target
from timm.models._manipulate import group_with_matcher
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import auto_group_layers
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..core.gate import gate_modules
from ..core.model import head_parameters, model_num_classes
from ..core.surgery import gates, is_gate_parameter, trainable_parameter_count
from ..errors import UserError

STAGE_KINDS = ("gates", "head", "full")
FROZEN_BASE_KINDS = ("gates", "head")  # the base's weights and BN statistics stay put
BASE_LR_SCALE = 0.1


# field: (the test of its range, the range in words); each is a number
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("epochs", "grad_accum"), (lambda v: v >= 1, "a whole number >= 1")),
    **dict.fromkeys(("lr", "base_lr", "head_lr", "weight_decay", "gate_weight_decay", "min_lr",
                     "mixup", "cutmix"), (lambda v: v >= 0, "a number >= 0")),
    "smoothing": (lambda v: 0 <= v < 1, "a fraction, 0 <= smoothing < 1"),
    "warmup": (lambda v: 0 <= v < 1, "a fraction of the stage, 0 <= warmup < 1"),
    "clip_grad": (lambda v: v > 0, "a gradient norm > 0"),
    "layer_decay": (lambda v: 0 < v <= 1, "a factor, 0 < layer_decay <= 1 (e.g. 0.75)"),
}


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe. Learning rates are for the global batch. A number given as
    text (the command line, YAML 1.1's ``1e-3``) is read as the number."""

    name: str
    kind: str
    epochs: int = 1
    lr: float = 1e-3                  # gates, and the head in a gates or head stage
    base_lr: float | None = None      # full stage: the base; None = 0.1 x lr
    weight_decay: float = 0.01        # base weights with more than one dim
    gate_weight_decay: float = 0.01   # gate alpha and gamma; beta never decays
    train_head: bool = False          # gates stage: the classifier head trains too
    train_bn: bool = False            # gates, head stage: BN affine (weight, bias) train too
    freeze_bn: bool | None = None     # BN running stats frozen; None = True for gates, head
    opt: str = "adamw"                # any timm optimizer name
    sched: str = "cosine"             # any timm scheduler name
    warmup: float = 0.1               # fraction of the stage's steps spent warming up
    min_lr: float = 0.0
    keep_frozen: tuple[str, ...] = ()  # regexes on parameter names that never train
    # timm's fine-tuning knobs, all off by default (docs/finetuning.md, "Training knobs")
    smoothing: float = 0.0            # label smoothing (folded into mixup's targets when mixing)
    mixup: float = 0.0                # timm Mixup alpha (0: off)
    cutmix: float = 0.0               # timm CutMix alpha (0: off)
    clip_grad: float | None = None    # clip the gradient norm to this (None: off)
    grad_accum: int = 1               # micro-batches of --batch-size per optimizer step
    layer_decay: float | None = None  # layer-wise lr decay factor (None: off)
    head_lr: float | None = None      # full stage: the head's own lr (None: base_lr)

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if self.kind not in STAGE_KINDS:
            raise UserError(f"{where}: unknown kind {self.kind!r}; choose one of "
                            f"{', '.join(STAGE_KINDS)}")
        for f in fields(self):
            value, rule = getattr(self, f.name), _RULES.get(f.name)
            if rule is None or (value is None and "None" in f.type):
                continue
            kind = int if f.type.startswith("int") else float
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = kind(value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, bool) or not isinstance(value, (int, kind)):
                raise UserError(f"{where}: {f.name} must be "
                                f"{'a whole number' if kind is int else 'a number'}, got {value!r}")
            if not rule[0](value):
                raise UserError(f"{where}: {f.name} must be {rule[1]}, got {value!r}")
        # keep_frozen: one pattern, or a list of them
        patterns = (self.keep_frozen,) if isinstance(self.keep_frozen, str) else self.keep_frozen
        try:
            for pattern in patterns:
                re.compile(pattern)
        except (re.error, TypeError) as e:
            raise UserError(f"{where}: keep_frozen takes regular expressions on parameter names; "
                            f"{self.keep_frozen!r}: {e}") from None
        object.__setattr__(self, "keep_frozen", tuple(patterns))

    @property
    def bn_frozen(self) -> bool:
        return self.kind in FROZEN_BASE_KINDS if self.freeze_bn is None else self.freeze_bn

    @property
    def effective_base_lr(self) -> float:
        """The one rule for the base weights' lr: ``base_lr`` when given, else 0.1 x ``lr``."""
        return self.lr * BASE_LR_SCALE if self.base_lr is None else self.base_lr

    def to_dict(self) -> dict:
        return {**asdict(self), "keep_frozen": list(self.keep_frozen),
                "base_lr": self.effective_base_lr, "freeze_bn": self.bn_frozen}


# --- which parameters are which -----------------------------------------------------

def gate_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(betas, alphas_and_gammas)`` of every gate."""
    found = gate_modules(model)
    return [g.beta for g in found], [p for g in found for p in (g.alpha, g.gamma)]


def bn_modules(model: nn.Module) -> list[nn.Module]:
    """Norm layers with running statistics (BatchNorm 1/2/3d, timm's BatchNormAct2d...)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


# --- freezing ---------------------------------------------------------------------

_USER_FLAGS = "_gct_user_frozen"  # names of the parameters the user froze
_BASE_FROZEN = "_gct_base_frozen"  # freeze_base holds the model


def kept_frozen(model: nn.Module, stage: Stage) -> set[int]:
    """Parameters that never train: the user's own frozen ones and the stage's
    ``keep_frozen`` patterns (each must match a parameter outside the gates). The user's
    are those frozen the first time, recorded on the model."""
    named = list(model.named_parameters())
    user = model.__dict__.setdefault(_USER_FLAGS, {n for n, p in named if not p.requires_grad})
    ids = {id(p) for n, p in named if n in user}
    for pattern in stage.keep_frozen:
        hits = [(n, p) for n, p in named if re.search(pattern, n)]
        if all(is_gate_parameter(n) for n, _ in hits):
            example = next((n for n, _ in named if not is_gate_parameter(n)), "none")
            raise UserError(f"stage {stage.name!r}: keep_frozen pattern {pattern!r} matches no "
                            f"parameter (names look like {example!r})")
        ids |= {id(p) for _, p in hits}
    return ids


def freeze_for_stage(model: nn.Module, stage: Stage, *, allow_empty: bool = False) -> int:
    """Set ``requires_grad`` for the stage and return how many values train. ``allow_empty``:
    a control run (gates removed) may have nothing to train; elsewhere that is a mistake."""
    frozen = kept_frozen(model, stage)
    trainable = set(map(id, model.parameters())) if stage.kind == "full" else set()
    if stage.kind == "gates":
        trainable |= {id(p) for group in gate_parameters(model) for p in group}
    if stage.kind == "head" or stage.train_head:
        trainable |= set(map(id, head_parameters(model)))
    if stage.train_bn:
        trainable |= {id(p) for m in bn_modules(model) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable and id(p) not in frozen)
    n = trainable_parameter_count(model)
    if n == 0 and not allow_empty:
        why = ("the model has no classifier head (no Linear layer); use a 'gates' or 'full' stage"
               if stage.kind == "head" else "the model has no gates, or all of it is frozen; add "
               "gates with `gct-surgery inject MODEL`, or pass --train-head, or use a 'full' "
               "stage (--stage full)")
        raise UserError(f"stage {stage.name!r} has nothing to train: {why}")
    return n


def hold_gamma(model: nn.Module) -> None:
    """A static control's gates: gamma at 0 and never trained (each gate a fixed scale
    1 + tanh(beta)). Set before the first stage, it is remembered as a user's flag."""
    for g in gate_modules(model):
        g.gamma.requires_grad_(False).zero_()


def set_train_mode(model: nn.Module, stage: Stage) -> None:
    """``model.train()``, then BN back to eval when the stage freezes its statistics."""
    model.train()
    for m in bn_modules(model) if stage.bn_frozen else ():
        m.eval()


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """A held BN's ``train``: eval whatever is asked (module level: a held model pickles)."""
    return nn.Module.train(module, False)


# --- your own training loop ---------------------------------------------------------

def freeze_base(model: nn.Module, *, train_head: bool = False, train_bn: bool = False) -> int:
    """Freeze everything but the gates (and the classifier head with ``train_head``,
    BatchNorm weight and bias with ``train_bn``); return how many values train.

    BatchNorm running statistics stay frozen even after ``model.train()``: each BN is held
    in eval mode (its ``train`` overridden) until ``unfreeze``. The user's own
    ``requires_grad`` flags are remembered first, and a parameter the user froze never trains."""
    if not gate_modules(model) and not (train_head or train_bn):
        raise UserError("freeze_base: the model has no gates, so nothing would train; "
                        "inject them first (gct_surgery.inject(model))")
    n = freeze_for_stage(model, Stage("freeze_base", "gates", train_head=train_head,
                                      train_bn=train_bn))
    for m in bn_modules(model):
        m.__dict__.setdefault("train", functools.partial(_stay_in_eval, m))  # held in eval
        m.train(False)
    model.__dict__[_BASE_FROZEN] = True
    return n


def unfreeze(model: nn.Module) -> int:
    """Back to the user's own flags (a parameter the user froze stays frozen) and
    BatchNorm that follows ``model.train()`` again; return how many values train."""
    frozen = model.__dict__.pop(_USER_FLAGS, None)
    for name, p in model.named_parameters() if frozen is not None else ():
        p.requires_grad_(name not in frozen)
    for m in bn_modules(model):
        m.__dict__.pop("train", None)  # freeze_base's hold, if any
        m.train(model.training)
    model.__dict__.pop(_BASE_FROZEN, None)
    return trainable_parameter_count(model)


def param_groups(model: nn.Module, *, lr: float, base_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for any torch optimizer: trainable parameters only, each group
    named (``gate_beta``, ``gate_alpha_gamma``, ``head_*``, ``base_*``).

    Gates train at ``lr``. The base, when it trains (after ``unfreeze``), at ``base_lr``
    (default 0.1 x ``lr``, as the built-in recipe); while ``freeze_base`` holds the
    model, what it lets train (head, BN affine) uses ``lr``. ``weight_decay`` applies to
    gate alpha and gamma and to base weights with more than one dimension; gate ``beta``,
    biases and norm weights never decay."""
    kind = "gates" if model.__dict__.get(_BASE_FROZEN) else "full"
    groups = stage_param_groups(model, Stage("param_groups", kind, lr=lr, base_lr=base_lr,
                                             weight_decay=weight_decay,
                                             gate_weight_decay=weight_decay))
    if not groups:
        raise UserError("param_groups: nothing in the model trains (every parameter has "
                        "requires_grad=False)")
    return groups


# --- optimizer, scheduler -----------------------------------------------------------

def stage_param_groups(model: nn.Module, stage: Stage) -> list[dict]:
    """Named parameter groups with their own lr and weight decay (trainable only).

    ``gate_beta`` always has weight decay 0. Base parameters with one dimension or
    fewer (biases, norm affine) get no decay either, as timm does. In a gates or head
    stage the head (when it trains) is new or adapting: it takes the stage lr."""
    betas, others = gate_parameters(model)
    frozen_base = stage.kind in FROZEN_BASE_KINDS
    base_lr = stage.lr if frozen_base else stage.effective_base_lr
    head_lr = stage.lr if frozen_base else stage.head_lr  # None: the head is base
    head = set(map(id, head_parameters(model))) if head_lr is not None else set()
    groups = {"gate_beta": dict(params=betas, lr=stage.lr, weight_decay=0.0),
              "gate_alpha_gamma": dict(params=others, lr=stage.lr,
                                       weight_decay=stage.gate_weight_decay)}
    for part, lr in (("head", head_lr), ("base", base_lr)):
        groups[f"{part}_decay"] = dict(params=[], lr=lr, weight_decay=stage.weight_decay)
        groups[f"{part}_no_decay"] = dict(params=[], lr=lr, weight_decay=0.0)
    gate_ids = set(map(id, betas + others))
    for p in model.parameters():
        if id(p) not in gate_ids:
            part = "head" if id(p) in head else "base"
            groups[f"{part}_{'decay' if p.ndim > 1 else 'no_decay'}"]["params"].append(p)
    out = [{"name": name, **g, "params": [p for p in g["params"] if p.requires_grad]}
           for name, g in groups.items()]
    out = [g for g in out if g["params"]]
    return out if stage.layer_decay is None else _by_layer(model, out, stage.layer_decay)


def _by_layer(model: nn.Module, groups: list[dict], decay: float) -> list[dict]:
    """Layer-wise lr decay (timm's ``layer_decay``) composed with the stage's groups: each
    group split by layer, with ``lr_scale = decay ** (L-1-i)`` for layer ``i`` of ``L``
    (timm's ``group_matcher`` grouping, else ``auto_group_layers``); a gate takes its
    conv's layer. Within a name the last group is the top layer, whose lr metrics report."""
    named = [(n, p) for n, p in model.named_parameters() if not is_gate_parameter(n)]
    if callable(getattr(model, "group_matcher", None)):
        layer_of = group_with_matcher(named, model.group_matcher(coarse=False), reverse=True)
    else:
        layer_of = auto_group_layers(model)
    top = max(layer_of.values(), default=0)
    if top == 0:
        raise UserError(f"--layer-decay: timm finds no layers in {type(model).__name__} (it has no "
                        "group_matcher, as timm models do), so every parameter would get the same "
                        "rate; run without --layer-decay")
    scale_of = {id(p): decay ** (top - layer_of.get(n, top)) for n, p in model.named_parameters()}
    for conv, gate in gates(model).items():
        conv_scale = scale_of[id(model.get_submodule(conv).weight)]
        scale_of.update((id(p), conv_scale) for p in gate.parameters())

    def scale(p: nn.Parameter) -> float:
        return scale_of[id(p)]

    return [{**g, "params": list(same), "lr_scale": s}  # each group split by scale, in order
            for g in groups for s, same in itertools.groupby(sorted(g["params"], key=scale), scale)]


def make_optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    """A fresh optimizer for the stage (never reused: stale groups miss parameters)."""
    try:
        return create_optimizer_v2(model, opt=stage.opt, lr=stage.lr,
                                   weight_decay=stage.weight_decay,
                                   param_group_fn=lambda m: stage_param_groups(m, stage))
    except (ValueError, AssertionError) as e:
        raise UserError(f"stage {stage.name!r}: optimizer {stage.opt!r}: {e}") from None


def make_scheduler(optimizer, stage: Stage, steps_per_epoch: int):
    """timm's scheduler stepped per update: linear warm-up, then cosine (by default)."""
    with contextlib.suppress(ValueError):
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=stage.sched, num_epochs=stage.epochs,
            warmup_epochs=stage.warmup * stage.epochs, warmup_lr=1e-6 if stage.warmup else 0.0,
            min_lr=stage.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        if scheduler is not None:  # None: 'none'
            return scheduler
    raise UserError(f"stage {stage.name!r}: unknown scheduler {stage.sched!r}; use one of "
                    "cosine, tanh, step, multistep, constant, poly, wsd (--sched)")


def trained_words(model: nn.Module, stage: Stage, *, gamma_held: bool = False) -> str:
    """What ``stage`` trains and at which learning rate, in words (a comparison's report)."""
    gated = bool(gate_modules(model))
    if stage.kind == "full":
        words = f"everything, the base at lr {stage.effective_base_lr:g}"
        words += f", the gates at lr {stage.lr:g}" if gated else ""
        words += f", the head at lr {stage.head_lr:g}" if stage.head_lr is not None else ""
    else:
        parts = [name for name, on in (("gates", stage.kind == "gates" and gated),
                                        ("head", stage.kind == "head" or stage.train_head),
                                        ("BatchNorm affine", stage.train_bn)) if on]
        words = f"{' + '.join(parts) or 'nothing'} at lr {stage.lr:g}"
    return words + ("; gamma held at 0" if gated and gamma_held else "")


# --- the batch regulariser ----------------------------------------------------------

def regularizer_for(stage: Stage, task: Any, model: nn.Module,
                    batch_per_rank: int) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]:
    """What a train step does to a batch ``(x, y)`` before the task's loss scores it: timm's
    Mixup and label smoothing, as timm's train.py composes them (the targets become (N,
    classes) probabilities, the smoothing folded in); the batch as it is when every knob is
    off. Validation never mixes. A task gets mixing or smoothing only when its loss takes
    soft targets (``soft_targets = True``, as classification's does): mixing a segmenter's
    masks as class vectors would be wrong."""
    mixing = bool(stage.mixup or stage.cutmix)
    if not (mixing or stage.smoothing):
        return lambda x, y: (x, y)
    if not getattr(task, "soft_targets", False):
        raise UserError(f"stage {stage.name!r}: --smoothing, --mixup and --cutmix need class "
                        f"targets, and the task {type(task).__name__} does not declare "
                        "soft_targets = True (a loss for (N, classes) probabilities); run "
                        "without them, or add that to the task")
    classes = model_num_classes(model) or len(getattr(task, "class_names", None) or ())
    if not classes:
        raise UserError(f"stage {stage.name!r}: --smoothing/--mixup/--cutmix need the class count, "
                        "and the model has no classifier head timm can read; run without them")
    if not mixing:  # smoothed one-hot targets: timm's LabelSmoothingCrossEntropy, as soft targets
        return lambda x, y: (x, mixup_target(y, classes, 1.0, stage.smoothing))
    if batch_per_rank % 2:
        raise UserError(f"stage {stage.name!r}: --mixup/--cutmix pair each image with another, so "
                        f"the batch per process must be even, not {batch_per_rank}; change "
                        "--batch-size")
    return Mixup(mixup_alpha=stage.mixup, cutmix_alpha=stage.cutmix,
                 label_smoothing=stage.smoothing, num_classes=classes)
