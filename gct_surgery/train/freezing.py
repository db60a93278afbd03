"""The staged protocol for your own training loop: three functions over ``stages``.

``finetune`` runs gates-then-full for you; a user who keeps their own loop, dataset
and loss calls these instead, with any torch optimizer::

    gct_surgery.freeze_base(model)                       # the gates stage
    opt = torch.optim.AdamW(gct_surgery.param_groups(model, lr=1e-3))
    ...                                                  # your loop, model.train() and all
    gct_surgery.unfreeze(model)                          # the full stage
    opt = torch.optim.AdamW(gct_surgery.param_groups(model, lr=1e-3, base_lr=1e-4))

They share one implementation with ``finetune``'s stages (``stages.py``): the same
parameters train, BatchNorm statistics are frozen the same way, ``beta`` never decays.
"""
from __future__ import annotations

from torch import nn

from ..errors import UserError
from .stages import (Stage, base_is_frozen, freeze_for_stage, gate_modules, hold_bn_eval,
                     mark_base_frozen, release_bn, remember_user_flags, restore_user_flags)
from .stages import param_groups as stage_param_groups


def freeze_base(model: nn.Module, *, train_head: bool = False, train_bn: bool = False) -> int:
    """Freeze everything but the gates (and the classifier head with ``train_head``,
    BatchNorm weight and bias with ``train_bn``); return how many values train.

    BatchNorm running statistics stay frozen even after ``model.train()``: each BN is
    held in eval mode until ``unfreeze``. (``requires_grad=False`` alone lets them
    drift at the first training forward.) The user's own ``requires_grad`` flags are
    remembered first, and a parameter the user froze never trains."""
    if not gate_modules(model) and not (train_head or train_bn):
        raise UserError("freeze_base: the model has no gates, so nothing would train; "
                        "inject them first (gct_surgery.inject(model))")
    remember_user_flags(model)
    n = freeze_for_stage(model, Stage("freeze_base", "gates", train_head=train_head,
                                      train_bn=train_bn))
    hold_bn_eval(model)
    mark_base_frozen(model, True)
    return n


def unfreeze(model: nn.Module) -> int:
    """Back to the user's own flags (a parameter the user froze stays frozen) and
    BatchNorm that follows ``model.train()`` again; return how many values train."""
    restore_user_flags(model)
    release_bn(model)
    mark_base_frozen(model, False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model: nn.Module, *, lr: float, base_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for any torch optimizer: trainable parameters only, each group
    named (``gate_beta``, ``gate_alpha_gamma``, ``head_*``, ``base_*``).

    Gates train at ``lr``. The base, when it trains (after ``unfreeze``), at
    ``base_lr`` (default 0.1 x lr, as the built-in recipe); while ``freeze_base``
    holds the model, what it lets train (head, BN affine) uses ``lr``.
    ``weight_decay`` applies to gate alpha and gamma and to base weights with more than
    one dimension; gate ``beta``, biases and norm weights never decay."""
    kind = "gates" if base_is_frozen(model) else "full"
    try:
        stage = Stage("param_groups", kind, lr=lr, base_lr=base_lr, weight_decay=weight_decay,
                      gate_weight_decay=weight_decay)
    except UserError as e:
        raise UserError(str(e).replace("stage 'param_groups': ", "param_groups: ")) from None
    groups = stage_param_groups(model, stage)
    if not groups:
        raise UserError("param_groups: nothing in the model trains (every parameter has "
                        "requires_grad=False)")
    return groups
