"""Target selection: the default gates every conv; filters and errors are precise."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from gct_surgery.errors import NoTargetsError, UserError
from gct_surgery.core.targets import TargetSpec, select_targets


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", pretrained=False)


def test_default_selects_every_conv_including_stem_and_downsample(resnet18):
    sel = select_targets(resnet18)
    names = [t.name for t in sel.selected]
    assert len(names) == 20
    assert "conv1" in names  # the stem, on the RGB input
    assert "layer2.0.downsample.0" in names  # shortcut convs get their own gate
    stem = next(t for t in sel.selected if t.name == "conv1")
    assert stem.in_channels == 3 and stem.kernel_size == (7, 7)


def test_include_and_exclude_are_regexes_on_module_names(resnet18):
    sel = select_targets(resnet18, TargetSpec(include=(r"^layer4\.",), exclude=(r"downsample",)))
    assert [t.name for t in sel.selected] == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    reasons = {t.name: t.reason for t in sel.skipped}
    assert reasons["layer4.0.downsample.0"] == "excluded by 'downsample'"
    assert reasons["conv1"] == "not included"


def test_repeated_patterns_union(resnet18):
    sel = select_targets(resnet18, TargetSpec(include=(r"^conv1$", r"layer1\.0\.conv1")))
    assert {t.name for t in sel.selected} == {"conv1", "layer1.0.conv1"}


def test_min_channels_and_depthwise():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 32, 1))
    sel = select_targets(model, TargetSpec(min_channels=8, skip_depthwise=True))
    assert [t.name for t in sel.selected] == ["2"]
    assert {t.name: t.reason for t in sel.skipped} == {"0": "fewer than 8 channels", "1": "depthwise"}


def test_conv1d_and_conv3d_are_candidates():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv3d(4, 4, 3))
    sel = select_targets(model)
    assert [(t.name, t.spatial_dims) for t in sel.selected] == [("0", 1), ("2", 3)]


def test_no_match_is_an_error_naming_the_patterns(resnet18):
    with pytest.raises(NoTargetsError) as e:
        select_targets(resnet18, TargetSpec(include=("nomatch",), min_channels=4))
    assert "--include 'nomatch'" in str(e.value)
    assert "--min-channels 4" in str(e.value)
    assert "20 convolutions" in str(e.value)


def test_model_without_convs_is_an_error():
    with pytest.raises(NoTargetsError, match="no convolution"):
        select_targets(nn.Sequential(nn.Linear(4, 4)))


def test_bad_regex_is_a_user_error():
    with pytest.raises(UserError, match=r"bad --exclude pattern '\['"):
        TargetSpec(exclude=("[",))


def test_tied_conv_is_one_target_with_aliases():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    sel = select_targets(model)
    assert len(sel.targets) == 1
    assert sel.targets[0].name == "0" and sel.targets[0].aliases == ["2"]


def test_timm_mixed_conv_is_gated_as_a_unit():
    model = timm.create_model("mixnet_s", pretrained=False)
    sel = select_targets(model)
    kinds = {t.kind for t in sel.selected}
    assert "MixedConv2d" in kinds
    mixed = next(t for t in sel.selected if t.kind == "MixedConv2d")
    # its child convs are not separate targets
    assert not any(t.name.startswith(mixed.name + ".") for t in sel.targets)
    assert mixed.in_channels == sum(c.in_channels for c in mixed.module.values())
    x = torch.randn(1, 3, 64, 64)
    assert model.eval()(x).shape == (1, 1000)
