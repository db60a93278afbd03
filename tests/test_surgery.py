"""Surgery: identity at injection, keys kept, idempotent, reversible."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

from gct_surgery import GCT, TargetSpec, gates, inject, remove
from gct_surgery.errors import UserError
from gct_surgery.core.surgery import gated_modules, is_gate_parameter


def _model(name="resnet18"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _randomize_bn(model):
    """Non-trivial BN statistics, so identity is not an accident of init."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_resnet18_gets_20_gates_and_identity_bit_for_bit():
    model = _randomize_bn(_model())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = inject(model)
    with torch.no_grad():
        after = model(x)
    assert report.gates_added == 20 and report.gates_total == 20
    assert torch.equal(before, after)
    assert report.params_added == sum(3 * g.channels for g in gates(model).values())
    assert report.base_params == 11_689_512
    assert report.trainable_params == report.base_params + report.params_added


def test_resnet50_gets_53_gates_and_67593_parameters():
    report = inject(timm.create_model("resnet50", pretrained=False))
    assert report.gates_added == 53
    assert report.params_added == 67_593
    assert 0.25 < report.params_added_pct < 0.27


def test_keys_are_kept_and_original_state_dict_loads():
    model = _model()
    original = copy.deepcopy(model.state_dict())
    inject(model)
    gated_keys = set(model.state_dict())
    assert set(original) <= gated_keys
    added = gated_keys - set(original)
    assert added and all(is_gate_parameter(k) for k in added)
    assert "layer1.0.conv1.gate.alpha" in added
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".gate." in k for k in result.missing_keys)


def test_gate_parameters_start_at_identity_values():
    model = _model()
    inject(model)
    g = gates(model)["layer1.0.conv1"]
    assert g.alpha.shape == (1, 64, 1, 1)
    assert torch.all(g.alpha == 1) and torch.all(g.gamma == 0) and torch.all(g.beta == 0)


def test_inject_twice_equals_inject_once():
    once, twice = _model(), _model()
    inject(once)
    inject(twice)
    report = inject(twice)
    assert report.gates_added == 0 and report.gates_total == 20
    assert list(once.state_dict()) == list(twice.state_dict())
    assert all(not isinstance(m.gate.alpha, GCT) for m in gated_modules(twice).values())
    # no gate inside a gate
    assert not any(".gate.gate" in k for k in twice.state_dict())


def test_partial_then_full_injection_adds_only_the_missing_gates():
    model = _model()
    inject(model, TargetSpec(include=("layer1",)))
    report = inject(model)
    assert report.gates_added == 16 and report.gates_total == 20


def test_remove_restores_types_and_state_dict():
    model = _model()
    original = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    inject(model)
    assert type(model.conv1).__name__ == "GatedConv2d"
    assert isinstance(model.conv1, nn.Conv2d)  # still a Conv2d for isinstance checks
    assert remove(model) == 20
    assert {n: type(m) for n, m in model.named_modules()} == types
    restored = model.state_dict()
    assert list(restored) == list(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_gated_model_deepcopies_pickles_and_traces():
    model = _model()
    inject(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(copy.deepcopy(model)(x), ref)
        buf = io.BytesIO()
        torch.save(model, buf)  # a whole-module pickle must find the gated classes by name
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), ref)
        traced = torch.fx.symbolic_trace(model)
        assert any("gate" in str(n.target) for n in traced.graph.nodes)
        assert torch.equal(traced(x), ref)
    assert pickle.dumps(type(model.conv1))  # the class itself is importable


def test_trained_gates_change_the_output_and_gradients_flow():
    model = _model()
    inject(model)
    x = torch.randn(2, 3, 64, 64)
    out = model(x).sum()
    out.backward()
    # the downsample path: timm zero-inits the last BN of each residual branch
    g = gates(model)["layer2.0.downsample.0"]
    assert g.beta.grad is not None and g.beta.grad.abs().sum() > 0
    assert g.gamma.grad is not None and g.gamma.grad.abs().sum() > 0
    with torch.no_grad():
        before = model(x)
        g.beta.fill_(0.5)
        assert not torch.equal(model(x), before)


def test_torchvision_model_identity():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = inject(model)
    assert report.gates_added == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_tied_conv_gets_one_gate_seen_at_both_places():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    report = inject(model)
    assert report.gates_added == 1
    assert model[0].gate is model[2].gate


def test_wrapped_model_is_refused_with_a_fix():
    with pytest.raises(UserError, match="model.module"):
        inject(nn.DataParallel(nn.Sequential(nn.Conv2d(3, 3, 1))))


def test_failed_selection_leaves_the_model_untouched():
    model = _model()
    before = list(model.state_dict())
    with pytest.raises(UserError):
        inject(model, TargetSpec(include=("nomatch",)))
    assert list(model.state_dict()) == before


def test_gate_follows_weight_device_and_dtype():
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).double()
    inject(model)
    assert model[0].gate.alpha.dtype == torch.float64
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert model(x).dtype == torch.float64
