"""Stages as data: what trains, whether BatchNorm statistics are frozen, and the
optimizer settings of each parameter group.

Three kinds of stage, after the protocols practitioners use on pretrained models:

``gates``
    Only the gate parameters train; every other tensor, BatchNorm running
    statistics included, stays bit-identical. BN is kept in eval mode even though
    ``model.train()`` runs each epoch (``requires_grad=False`` alone does not stop
    running statistics from drifting). Options: train the classifier head (needed
    when it was replaced for a new class count) and the BN affine parameters.
``head``
    Only the classifier head trains ("linear probe"): gates and base stay frozen,
    BatchNorm statistics included, as in a gates stage. A head-then-full recipe is
    the control that separates the protocol's effect from the gates' (GCT-NOTES).
    ``train_bn`` adds the BN affine parameters.
``full``
    Everything trains; the base at a lower learning rate than the gates.

Parameters the user froze (``requires_grad=False`` when the first stage starts, e.g.
a BatchNorm bias fixed at zero) stay frozen in every stage, ``full`` included, and so
do parameters matching the stage's ``keep_frozen`` patterns. The user's flags are
remembered on the model (``remember_user_flags``) the first time a stage freezes it.

Weight decay: gate ``beta`` never decays (the official code: "not to apply weight
decay on the gating bias"); ``alpha`` and ``gamma`` use ``gate_weight_decay``. Gate
parameters are found by module type (``GCT``), not by name. timm's optimizer factory
would decay them: it exempts only parameters with one dimension or fewer, and gate
tensors are shaped (1, C, 1, 1). So the groups are built here and handed to
``create_optimizer_v2`` through its ``param_group_fn``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import functools
import re

import torch
from torch import nn

from ..core.gate import GCT
from ..core.heads import head_parameters
from ..errors import UserError

STAGE_KINDS = ("gates", "head", "full")
FROZEN_BASE_KINDS = ("gates", "head")  # the base's weights and BN statistics stay put
DEFAULT_BASE_LR_SCALE = 0.1  # full stage: base lr = gate lr x this, unless base_lr is set


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe. Learning rates are for the global batch."""

    name: str
    kind: str
    epochs: int = 1
    lr: float = 1e-3                  # gates, and the head in a gates or head stage
    base_lr: float | None = None      # full stage: the base; None = lr x 0.1
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
        patterns = (self.keep_frozen,) if isinstance(self.keep_frozen, str) else self.keep_frozen
        if not isinstance(patterns, (list, tuple)):
            raise UserError(f"stage {self.name!r}: keep_frozen should be a list of regular "
                            f"expressions on parameter names, got {self.keep_frozen!r}")
        object.__setattr__(self, "keep_frozen", tuple(patterns))
        for pattern in self.keep_frozen:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise UserError(f"stage {self.name!r}: keep_frozen pattern {pattern!r} is not a "
                                f"regular expression: {e}") from None
        if self.kind not in STAGE_KINDS:
            raise UserError(f"stage {self.name!r}: unknown kind {self.kind!r}; "
                            f"choose one of {', '.join(STAGE_KINDS)}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise UserError(f"stage {self.name!r}: epochs must be a whole number >= 1, got {self.epochs!r}")
        for key in ("lr", "weight_decay", "gate_weight_decay", "min_lr"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"stage {self.name!r}: {key} must be a number >= 0, got {value!r}")
        for key in ("base_lr", "head_lr"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise UserError(f"stage {self.name!r}: {key} must be a number >= 0, got {value!r}")
        for key in ("smoothing", "mixup", "cutmix"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"stage {self.name!r}: {key} must be a number >= 0, got {value!r}")
        if self.smoothing >= 1:
            raise UserError(f"stage {self.name!r}: smoothing is a fraction, 0 <= smoothing < 1, "
                            f"got {self.smoothing!r}")
        if self.clip_grad is not None and not _positive(self.clip_grad):
            raise UserError(f"stage {self.name!r}: clip_grad is a gradient norm > 0, got {self.clip_grad!r}")
        if not isinstance(self.grad_accum, int) or isinstance(self.grad_accum, bool) or self.grad_accum < 1:
            raise UserError(f"stage {self.name!r}: grad_accum must be a whole number >= 1, "
                            f"got {self.grad_accum!r}")
        if self.layer_decay is not None and not (_positive(self.layer_decay) and self.layer_decay <= 1):
            raise UserError(f"stage {self.name!r}: layer_decay is a factor, 0 < layer_decay <= 1 "
                            f"(e.g. 0.75), got {self.layer_decay!r}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"stage {self.name!r}: warmup is a fraction of the stage, "
                            f"0 <= warmup < 1, got {self.warmup!r}")

    @property
    def bn_frozen(self) -> bool:
        return self.kind in FROZEN_BASE_KINDS if self.freeze_bn is None else self.freeze_bn

    @property
    def effective_base_lr(self) -> float:
        return self.lr * DEFAULT_BASE_LR_SCALE if self.base_lr is None else self.base_lr

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_frozen"] = list(self.keep_frozen)
        d["base_lr"] = self.effective_base_lr
        d["freeze_bn"] = self.bn_frozen
        return d

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# --- which parameters are which -----------------------------------------------------

def gate_modules(model: nn.Module) -> list[GCT]:
    return [m for m in model.modules() if isinstance(m, GCT)]


def gate_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(betas, alphas_and_gammas)`` of every gate, found by module type."""
    betas, others = [], []
    for g in gate_modules(model):
        betas.append(g.beta)
        others += [g.alpha, g.gamma]
    return betas, others


def bn_modules(model: nn.Module) -> list[nn.Module]:
    """Norm layers with running statistics (BatchNorm 1/2/3d, timm's BatchNormAct2d...)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


# --- freezing ---------------------------------------------------------------------

_USER_FLAGS = "_gct_user_frozen"  # names of the parameters the user froze
_BN_HELD = "_gct_bn_held"  # BatchNorm kept in eval mode whatever model.train() says
_BASE_FROZEN = "_gct_base_frozen"  # freeze_base holds the model


def remember_user_flags(model: nn.Module) -> frozenset[str]:
    """The names of the parameters the user froze (``requires_grad=False``), recorded
    on the model the first time; later calls return that first record."""
    frozen = model.__dict__.get(_USER_FLAGS)
    if frozen is None:
        frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
        model.__dict__[_USER_FLAGS] = frozen
    return frozen


def restore_user_flags(model: nn.Module) -> None:
    """Every parameter back to the user's own flag, and the record forgotten."""
    frozen = model.__dict__.pop(_USER_FLAGS, None)
    if frozen is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)


def kept_frozen(model: nn.Module, stage: Stage) -> set[int]:
    """Parameters that never train: the user's own frozen ones and the stage's
    ``keep_frozen`` patterns (each must match a parameter outside the gates)."""
    user = remember_user_flags(model)
    named = list(model.named_parameters())
    ids = {id(p) for n, p in named if n in user}
    for pattern in stage.keep_frozen:
        hits = [(n, p) for n, p in named if re.search(pattern, n)]
        if not any(not _is_gate_name(n) for n, _ in hits):
            example = next((n for n, _ in named if not _is_gate_name(n)), "none")
            raise UserError(f"stage {stage.name!r}: keep_frozen pattern {pattern!r} matches no "
                            f"parameter (names look like {example!r})")
        ids |= {id(p) for _, p in hits}
    return ids


def _is_gate_name(name: str) -> bool:
    return ".gate." in f".{name}"


def freeze_for_stage(model: nn.Module, stage: Stage, *, allow_empty: bool = False) -> int:
    """Set ``requires_grad`` for the stage and return how many parameters train.
    Parameters the user froze, or ``keep_frozen`` names, never train.

    ``allow_empty``: a control run (gates removed) may have a stage with nothing to
    train, which then leaves the model as it is; anywhere else that is a mistake."""
    frozen = kept_frozen(model, stage)
    if stage.kind == "full":
        trainable = {id(p) for p in model.parameters()}
    else:
        trainable = set()
        if stage.kind == "gates":
            betas, others = gate_parameters(model)
            trainable |= {id(p) for p in betas + others}
        if stage.kind == "head" or stage.train_head:
            trainable |= {id(p) for p in head_parameters(model)}
        if stage.train_bn:
            trainable |= {id(p) for m in bn_modules(model) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable and id(p) not in frozen)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0 and allow_empty:
        return 0
    if n == 0 and stage.kind == "head":
        raise UserError(f"stage {stage.name!r} has nothing to train: the model has no classifier "
                        "head (no Linear layer); use a 'gates' or 'full' stage")
    if n == 0:
        raise UserError(f"stage {stage.name!r} has nothing to train: the model has no gates, or "
                        "all of it is frozen; add gates with `gct-surgery inject MODEL`, or pass "
                        "--train-head, or use a 'full' stage (--stage full)")
    return n


def hold_gamma(model: nn.Module) -> None:
    """A static control's gates: gamma at 0 and never trained, so each gate is a fixed
    per-channel scale 1 + tanh(beta) that folds into its conv. Set before the first
    stage, the flag is remembered as a user's frozen parameter: every stage keeps it."""
    for g in gate_modules(model):
        with torch.no_grad():
            g.gamma.zero_()
        g.gamma.requires_grad_(False)


def trained_words(model: nn.Module, stage: Stage, *, gamma_held: bool = False) -> str:
    """What ``stage`` trains and at which learning rate, in words (a comparison's report)."""
    gates = bool(gate_modules(model))
    if stage.kind == "full":
        words = f"everything, the base at lr {stage.effective_base_lr:g}"
        words += f", the gates at lr {stage.lr:g}" if gates else ""
        words += f", the head at lr {stage.head_lr:g}" if stage.head_lr is not None else ""
    else:
        parts = [name for name, on in (("gates", stage.kind == "gates" and gates),
                                        ("head", stage.kind == "head" or stage.train_head),
                                        ("BatchNorm affine", stage.train_bn)) if on]
        words = f"{' + '.join(parts) or 'nothing'} at lr {stage.lr:g}"
    return words + ("; gamma held at 0" if gates and gamma_held else "")


def set_train_mode(model: nn.Module, stage: Stage) -> None:
    """``model.train()``, then BN back to eval when the stage freezes its statistics."""
    model.train()
    if stage.bn_frozen:
        for m in bn_modules(model):
            m.eval()


def hold_bn_eval(model: nn.Module) -> None:
    """Keep every BatchNorm in eval mode, its running statistics untouched, even
    through a later ``model.train()``: each one's ``train`` is overridden."""
    for m in bn_modules(model):
        if _BN_HELD not in m.__dict__:
            m.__dict__["train"] = functools.partial(_stay_in_eval, m)
            m.__dict__[_BN_HELD] = True
        m.train(False)


def release_bn(model: nn.Module, mode: bool | None = None) -> None:
    """Undo ``hold_bn_eval``: BatchNorm follows ``model.train()`` again, now set to
    ``mode`` (default: the model's own mode)."""
    for m in bn_modules(model):
        if m.__dict__.pop(_BN_HELD, None):
            m.__dict__.pop("train", None)
        m.train(model.training if mode is None else mode)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """A held BatchNorm's ``train``: eval whatever is asked (a module-level function,
    so a held model still pickles and deep-copies)."""
    return nn.Module.train(module, False)


def base_is_frozen(model: nn.Module) -> bool:
    """True between ``freeze_base`` and ``unfreeze`` (``mark_base_frozen``)."""
    return bool(model.__dict__.get(_BASE_FROZEN, False))


def mark_base_frozen(model: nn.Module, frozen: bool) -> None:
    if frozen:
        model.__dict__[_BASE_FROZEN] = True
    else:
        model.__dict__.pop(_BASE_FROZEN, None)


# --- optimizer groups -------------------------------------------------------------

def param_groups(model: nn.Module, stage: Stage) -> list[dict]:
    """Named parameter groups with their own lr and weight decay (trainable only).

    ``gate_beta`` always has weight decay 0. Base parameters with one dimension or
    fewer (biases, norm affine) get no decay either, as timm does.
    """
    betas, others = gate_parameters(model)
    gate_ids = {id(p) for p in betas + others}
    head_ids = {id(p) for p in head_parameters(model)}
    frozen_base = stage.kind in FROZEN_BASE_KINDS
    base_lr = stage.lr if frozen_base else stage.effective_base_lr
    own_head = frozen_base or stage.head_lr is not None  # the head in groups of its own
    head_lr = stage.lr if frozen_base else stage.head_lr
    groups: dict[str, dict] = {
        "gate_beta": dict(params=list(betas), lr=stage.lr, weight_decay=0.0),
        "gate_alpha_gamma": dict(params=list(others), lr=stage.lr, weight_decay=stage.gate_weight_decay),
        "head_decay": dict(params=[], lr=head_lr, weight_decay=stage.weight_decay),
        "head_no_decay": dict(params=[], lr=head_lr, weight_decay=0.0),
        "base_decay": dict(params=[], lr=base_lr, weight_decay=stage.weight_decay),
        "base_no_decay": dict(params=[], lr=base_lr, weight_decay=0.0),
    }
    for p in model.parameters():
        if id(p) in gate_ids:
            continue
        # In a gates or head stage the head (when it trains) is new or adapting: stage lr.
        prefix = "head" if own_head and id(p) in head_ids else "base"
        groups[f"{prefix}_{'decay' if p.ndim > 1 else 'no_decay'}"]["params"].append(p)
    out = []
    for name, g in groups.items():
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if g["params"]:
            out.append({"name": name, **g})
    return out if stage.layer_decay is None else _by_layer(model, out, stage.layer_decay)


def _by_layer(model: nn.Module, groups: list[dict], decay: float) -> list[dict]:
    """Each group split by layer, with the layer's ``lr_scale`` (layer_decay.py); within
    a name, the last group is the top layer (scale 1), whose lr the metrics report."""
    from .layer_decay import layer_scales

    scale_of = layer_scales(model, decay)
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        by_scale: dict[float, list] = {}
        for p in g["params"]:
            by_scale.setdefault(scale_of[name_of[id(p)]], []).append(p)
        for scale in sorted(by_scale):
            out.append({**g, "params": by_scale[scale], "lr_scale": scale})
    return out


def make_optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    """A fresh optimizer for the stage (never reused: stale groups miss parameters)."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(model, opt=stage.opt, lr=stage.lr,
                                   weight_decay=stage.weight_decay,
                                   param_group_fn=lambda m: param_groups(m, stage))
    except (ValueError, AssertionError) as e:
        raise UserError(f"stage {stage.name!r}: optimizer {stage.opt!r}: {e}") from None


def make_scheduler(optimizer, stage: Stage, steps_per_epoch: int):
    """timm's scheduler stepped per update: linear warm-up, then cosine (by default)."""
    from timm.scheduler import create_scheduler_v2

    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=stage.sched, num_epochs=stage.epochs,
            warmup_epochs=stage.warmup * stage.epochs, warmup_lr=1e-6 if stage.warmup else 0.0,
            min_lr=stage.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    except ValueError:
        scheduler = None
    if scheduler is None:  # an unknown name, or 'none'
        raise UserError(f"stage {stage.name!r}: unknown scheduler {stage.sched!r}; use one of "
                        "cosine, tanh, step, multistep, constant, poly, wsd (--sched)")
    return scheduler
