"""Stages: what trains, BatchNorm freezing, and weight decay per parameter group."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from gct_surgery.core.gate import GCT
from gct_surgery.core.model import replace_head
from gct_surgery.core.surgery import gated_modules, inject
from gct_surgery.errors import UserError
from gct_surgery.train.stages import (Stage, bn_modules, freeze_for_stage, gate_parameters,
                                      make_optimizer, set_train_mode, stage_param_groups)

GATES = Stage("g", "gates", lr=0.1, weight_decay=0.05, gate_weight_decay=0.05)
FULL = Stage("f", "full", lr=0.1, weight_decay=0.05, gate_weight_decay=0.05)
HEAD = Stage("h", "head", lr=0.1, weight_decay=0.05)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", num_classes=3)
    inject(m)
    return m


def first_gated(m):
    return next(iter(gated_modules(m).values()))


def trainable(m):
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_gates_stage_trains_only_gate_parameters(model):
    freeze_for_stage(model, GATES)
    names = trainable(model)
    assert names and all(".gate." in n for n in names)
    assert len(names) == 3 * sum(isinstance(m, GCT) for m in model.modules())


def test_gates_stage_options_add_head_and_bn_affine(model):
    freeze_for_stage(model, Stage("g", "gates", train_head=True))
    assert {"fc.weight", "fc.bias"} <= trainable(model)
    freeze_for_stage(model, Stage("g", "gates", train_bn=True))
    names = trainable(model)
    assert "bn1.weight" in names and "fc.weight" not in names and "conv1.weight" not in names


def test_head_stage_trains_only_the_head(model):
    freeze_for_stage(model, HEAD)
    assert trainable(model) == {"fc.weight", "fc.bias"}
    groups = {g["name"]: g for g in stage_param_groups(model, HEAD)}
    assert set(groups) == {"head_decay", "head_no_decay"} and groups["head_decay"]["lr"] == 0.1
    freeze_for_stage(model, Stage("h", "head", train_bn=True))
    assert "bn1.weight" in trainable(model) and "conv1.weight" not in trainable(model)


def test_head_stage_step_changes_the_head_alone_and_keeps_bn_statistics(model):
    """A real step: only head tensors move; BN running statistics stay bit-identical."""
    freeze_for_stage(model, HEAD)
    opt = make_optimizer(model, HEAD)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model, HEAD)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    assert any("running_mean" in k for k in before)  # there are BN statistics to keep


def test_head_stage_without_a_head_is_a_user_error():
    gated_conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    inject(gated_conv)
    with pytest.raises(UserError, match="no classifier head"):
        freeze_for_stage(gated_conv, HEAD)


def test_full_stage_trains_everything(model):
    freeze_for_stage(model, FULL)
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_bn_stays_in_eval_after_model_train(model):
    set_train_mode(model, GATES)
    assert model.training and bn_modules(model)
    assert not any(m.training for m in bn_modules(model))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    set_train_mode(model, FULL)
    assert all(m.training for m in bn_modules(model))


def test_beta_is_never_decayed_and_groups_cover_every_trainable(model):
    for stage in (GATES, FULL):
        freeze_for_stage(model, stage)
        opt = make_optimizer(model, stage)
        groups = {g["name"]: g for g in opt.param_groups}
        betas, others = gate_parameters(model)
        beta_ids = {id(p) for p in betas}
        assert {id(p) for p in groups["gate_beta"]["params"]} == beta_ids
        assert groups["gate_beta"]["weight_decay"] == 0.0
        assert groups["gate_alpha_gamma"]["weight_decay"] == 0.05
        decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
        assert not beta_ids & {id(p) for p in decayed}
        in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(in_opt) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert groups["base_decay"]["lr"] == pytest.approx(0.01)  # full: base at 0.1 x gate lr
    assert groups["gate_beta"]["lr"] == 0.1


def test_a_step_with_zero_grad_leaves_beta_and_decays_the_rest(model):
    freeze_for_stage(model, FULL)
    with torch.no_grad():
        for g in model.modules():
            if isinstance(g, GCT):
                g.beta.fill_(0.5)  # a decayed zero stays zero: make decay visible
    opt = make_optimizer(model, FULL)
    conv = first_gated(model)
    beta, alpha = conv.gate.beta.detach().clone(), conv.gate.alpha.detach().clone()
    weight = conv.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(conv.gate.beta, beta)
    assert not torch.equal(conv.gate.alpha, alpha)    # alpha decays
    assert not torch.equal(conv.weight, weight)       # base weights decay


def test_timm_default_groups_would_decay_beta(model):
    """Why the groups are built here: timm exempts only ndim <= 1 parameters."""
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=0.1, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(first_gated(model).gate.beta) in decayed


def test_optimizer_is_rebuilt_per_stage(model):
    freeze_for_stage(model, GATES)
    first = make_optimizer(model, GATES)
    freeze_for_stage(model, FULL)
    second = make_optimizer(model, FULL)
    n = lambda o: sum(len(g["params"]) for g in o.param_groups)  # noqa: E731
    assert second is not first and n(second) > n(first) == 3 * 15


def test_replace_head_timm_and_plain_linear(model):
    replace_head(model, 7)
    assert model.get_classifier().out_features == 7
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    replace_head(plain, 2)
    assert plain[3].out_features == 2 and plain[3].in_features == 4
    with pytest.raises(UserError, match="no classifier"):
        replace_head(nn.Sequential(nn.Conv2d(3, 4, 3)), 2)


def test_gates_stage_on_an_ungated_model_is_a_user_error():
    with pytest.raises(UserError, match="nothing to train"):
        freeze_for_stage(timm.create_model("test_resnet"), GATES)


@pytest.mark.parametrize("bad", [dict(kind="all"), dict(epochs=0), dict(lr=-1.0), dict(warmup=1.0),
                                 dict(epochs=1.5)])
def test_invalid_stage_fields(bad):
    with pytest.raises(UserError):
        Stage(**{"name": "s", "kind": "gates", **bad})


def test_bn_frozen_defaults_by_kind():
    assert Stage("a", "gates").bn_frozen and not Stage("b", "full").bn_frozen
    assert Stage("h", "head").bn_frozen
    assert Stage("c", "full", freeze_bn=True).bn_frozen
