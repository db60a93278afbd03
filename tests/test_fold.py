"""Folding: a gate with gamma = 0 is a constant per-channel scale and folds into its conv."""
from __future__ import annotations

import copy

import timm
import torch
from timm.layers import CondConv2d, MixedConv2d, StdConv2d
from torch import nn

import gct_surgery
import gct_surgery.cli
from gct_surgery.io.checkpoint import save
from gct_surgery.io.export import export
from gct_surgery.core.fold import fold_gates
from gct_surgery.operations import inject_model, open_model
from gct_surgery.core.surgery import gates, inject, is_gate_parameter, remove


def randomise(model, *, gamma: float = 0.0, seed: int = 0):
    """Random beta (and gamma with std ``gamma``), as a gates-only stage might leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.beta.copy_(torch.randn(gate.beta.shape, generator=g))
            gate.gamma.copy_(torch.randn(gate.gamma.shape, generator=g) * gamma)


def assert_beta_mattered(gated_model, x, gated_out):
    """Dropping the gates without folding changes the output: the fold did real work."""
    remove(gated_model)
    assert (outputs(gated_model, x) - gated_out).abs().max().item() > 1e-3


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


class Routed(nn.Module):
    """CondConv2d takes routing weights: a fixed mix of its experts, for the test."""

    def __init__(self):
        super().__init__()
        self.cond = CondConv2d(8, 8, 3, padding=1, groups=2, num_experts=3, bias=True)
        self.register_buffer("routing", torch.tensor([[0.2, 0.5, 0.3]]))

    def forward(self, x):
        return self.cond(x, self.routing.expand(x.shape[0], -1))


def odd_convs() -> nn.Module:
    """Every weight layout the fold handles: grouped, depthwise, transposed, biased,
    reflect-padded, 1-d-dilated, CondConv2d experts and MixedConv2d splits."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),        # grouped
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),        # depthwise
        nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, groups=2),  # transposed, grouped
        MixedConv2d(6, 8, kernel_size=[3, 5], padding="", depthwise=False),
        MixedConv2d(8, 8, kernel_size=[3, 5], padding="", depthwise=True),
        Routed(),
        nn.Conv2d(8, 4, 1),
    )


def test_fold_resnet_zero_gamma_random_beta():
    model = timm.create_model("resnet10t", num_classes=10).eval()
    names = set(model.state_dict())
    inject(model)
    randomise(model)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    gated = outputs(model, x)
    unfolded = copy.deepcopy(model)
    report = fold_gates(model)
    assert len(report.folded) == 14 and report.kept == {}
    assert gates(model) == {} and not any(is_gate_parameter(k) for k in model.state_dict())
    assert set(model.state_dict()) == names
    assert (outputs(model, x) - gated).abs().max().item() < 1e-5
    assert_beta_mattered(unfolded, x, gated)


def test_fold_grouped_depthwise_transposed_cond_and_mixed():
    torch.manual_seed(0)
    model = odd_convs().eval()
    inject(model)
    n_gates = len(gates(model))
    assert n_gates == 8
    randomise(model, seed=2)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    gated = outputs(model, x)
    unfolded = copy.deepcopy(model)
    report = fold_gates(model)
    assert sorted(report.folded) == sorted([*map(str, range(6)), "6.cond", "7"]), report.kept
    assert gates(model) == {}
    assert type(model[4]) is MixedConv2d and type(model[6].cond) is CondConv2d
    folded = outputs(model, x)
    assert (folded - gated).abs().max().item() < 1e-5
    assert_beta_mattered(unfolded, x, gated)


def test_weight_standardised_conv_is_refused_and_kept():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), StdConv2d(8, 8, 3)).eval()
    inject(model)
    randomise(model)
    x = torch.randn(1, 3, 16, 16)
    before = outputs(model, x)
    report = fold_gates(model)
    assert report.folded == ["0"]
    assert list(report.kept) == ["1"] and "StdConv2d" in report.kept["1"]
    assert list(gates(model)) == ["1"]
    assert (outputs(model, x) - before).abs().max().item() < 1e-5


def test_gate_with_gamma_above_tolerance_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).eval()
    inject(model)
    randomise(model, gamma=0.1)
    report = fold_gates(model, tol=1e-6)
    assert report.folded == [] and set(report.kept) == {"0", "1"}
    assert all("gamma" in why for why in report.kept.values())
    assert len(gates(model)) == 2


def test_export_fold_reports_count_and_difference(tmp_path):
    model, meta = open_model("timm:resnet10t", num_classes=10)
    meta.data["input_size"] = [3, 48, 48]
    result = inject_model(model, meta, input_size=[3, 48, 48])
    randomise(model, seed=5)
    src = tmp_path / "gated.safetensors"
    save(model, src, result.meta)
    out = tmp_path / "folded.safetensors"
    exported = export(src, out, fold=True)
    assert len(exported.fold.folded) == 14 and exported.gates == 0
    assert 0.0 < exported.max_abs_diff < 1e-5
    loaded = gct_surgery.load(out)
    assert gates(loaded) == {}
    x = torch.randn(2, 3, 48, 48)
    assert (outputs(loaded, x) - outputs(model, x)).abs().max().item() < 1e-5


def test_cli_fold_prints_count(tmp_path, capsys):
    model, meta = open_model("timm:resnet10t", num_classes=10)
    meta.data["input_size"] = [3, 48, 48]  # at 32 px layer4 sees 1x1 inputs: not gated
    result = inject_model(model, meta, input_size=[3, 48, 48])
    randomise(model, seed=6)
    src = tmp_path / "gated.safetensors"
    save(model, src, result.meta)
    code = gct_surgery.cli.run(["export", str(src), "-o", str(tmp_path / "f.safetensors"), "--fold"])
    out = capsys.readouterr().out
    assert code == 0
    assert "gates folded\t14" in out
    assert "max |Δ| vs source" in out
