"""The family matrix: the models people actually use, each through the whole tool.

For every model (timm's tiny ``test_*`` models, the smallest member of each common
timm family, and torchvision's classics), built with random weights:

1. inject a gate in front of every convolution; the output is unchanged bit for bit;
2. one gates-stage training step (the library's own freezing): gates change, and no
   other tensor does, BatchNorm running statistics included;
3. save the trained model and ``gct_surgery.load`` it back (the ``full`` export
   form): the outputs are equal bit for bit. ``export()`` itself (its reload check,
   the file it writes) runs on the tiny ``test_*`` models, where rebuilding is cheap.

The whole of timm is swept by ``scripts/coverage.py`` (see docs/coverage.md); this
file keeps one small representative per family in the default suite.
"""
from __future__ import annotations

import pytest
import timm
import torch

from fixtures import changed_keys, gates_stage_step, snapshot
from gct_surgery import load
from gct_surgery.io.checkpoint import save
from gct_surgery.io.metadata import CheckpointMeta
from gct_surgery.io.export import export
from gct_surgery.core.model import run_model
from gct_surgery.operations import inject_model
from gct_surgery.io.sources import ModelSource, build_model, model_data_config
from gct_surgery.core.surgery import gated_modules
from gct_surgery.core.targets import is_conv, select_targets

# spec, input size (C, H, W) where 64 px does not fit, build kwargs (to shrink)
TINY_SIZES = {"test_coatnet": 160, "test_maxvit": 160, "test_vit3": 160, "test_vit_relpos": 160}
TIMM_TEST_MODELS = [(f"timm:{n}", TINY_SIZES.get(n, 32), {}) for n in timm.list_models("test_*")]

TIMM_FAMILIES = [
    ("timm:resnet18", 32, {}),                      # resnet
    ("timm:resnet10t", 32, {}),                     # resnet-d: deep stem, avg-pool shortcut
    ("timm:resnext26ts", 32, {}),                   # resnext (grouped 3x3)
    ("timm:seresnext26d_32x4d", 32, {}),            # seresnext (SE convs are 1x1 Conv2d)
    ("timm:res2net50_48w_2s", 32, {}),              # res2net (split convs in a ModuleList)
    ("timm:resnest14d", 32, {}),                    # resnest (split attention, radix)
    ("timm:regnetx_002", 32, {}),                   # regnet
    ("timm:efficientnet_b0", 32, {}),               # efficientnet
    ("timm:tf_efficientnet_b0", 32, {}),            # tf_ variant: Conv2dSame, "same" padding
    ("timm:mobilenetv2_050", 32, {}),               # mobilenetv2
    ("timm:mobilenetv3_small_050", 32, {}),         # mobilenetv3 (hard-swish, SE)
    ("timm:mixnet_s", 32, {}),                      # MixedConv2d: mixed kernels, one gate
    ("timm:efficientnet_cc_b0_4e", 32, {}),         # CondConv2d: routed expert kernels
    ("timm:ghostnet_050", 32, {}),                  # ghostnet (cheap depthwise features)
    ("timm:rexnet_100", 32, {}),                    # rexnet
    ("timm:cs3darknet_focus_s", 32, {}),            # cspnet (focus stem)
    ("timm:dla46_c", 32, {}),                       # dla (tree aggregation)
    ("timm:dpn48b", 32, {}),                        # dpn (dual path)
    ("timm:densenet121", 32, {}),                   # densenet
    ("timm:hrnet_w18_small", 32, {}),               # hrnet (parallel resolutions, fuse)
    ("timm:inception_v3", 96, {}),                  # inception (needs >= 75 px)
    ("timm:xception41", 32, {}),                    # xception (separable convs)
    ("timm:vgg11", 32, {"mlp_ratio": 0.125}),       # vgg (conv MLP head shrunk 8x)
    ("timm:repvgg_a0", 32, {}),                     # repvgg (train-time branches)
    ("timm:convnext_atto", 32, {}),                 # convnext (depthwise 7x7)
    ("timm:nf_resnet26", 32, {}),                   # nfnet (ScaledStdConv2d: weight std)
]

TORCHVISION = [
    ("torchvision:resnet18", 32, {}),
    ("torchvision:mobilenet_v2", 32, {}),
    ("torchvision:mobilenet_v3_small", 32, {}),
    ("torchvision:efficientnet_b0", 32, {}),
    ("torchvision:convnext_tiny", 32, {}),
    ("torchvision:regnet_x_400mf", 32, {}),
    ("torchvision:densenet121", 32, {}),
    ("torchvision:vgg11", 32, {"num_classes": 10}),
    ("torchvision:shufflenet_v2_x0_5", 32, {}),
]

CASES = TIMM_TEST_MODELS + TIMM_FAMILIES + TORCHVISION
EXPORTED = {spec for spec, _, _ in TIMM_TEST_MODELS} | {"torchvision:shufflenet_v2_x0_5"}


def _open(spec: str, kwargs: dict):
    torch.manual_seed(0)
    source = ModelSource(spec, kwargs)
    model = build_model(source).eval()
    meta = CheckpointMeta(source=source.to_dict(), gate={}, gated=[], data=model_data_config(model))
    return model, meta


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} outputs vs {len(b)}"
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"{what}: max |Δ| {(x.double() - y.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("spec,size,kwargs", CASES, ids=[c[0] for c in CASES])
def test_family(spec, size, kwargs, tmp_path):
    model, meta = _open(spec, kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    before = run_model(model, x)
    n_convs = len(select_targets(model).targets)
    assert n_convs > 0 and any(is_conv(m) for m in model.modules())

    # 1. every conv gated, output unchanged bit for bit
    result = inject_model(model, meta, input_size=[3, size, size], verify=False)
    assert result.report.gates_total == n_convs == len(gated_modules(model))
    assert result.report.params_added > 0
    _assert_equal(before, run_model(model, x), "identity after injection")

    # 2. a gates-stage step changes gates and nothing else (BN statistics included)
    state = snapshot(model)
    loss = gates_stage_step(model, x)
    assert loss == loss, "loss is NaN"
    gate_changes, other_changes = changed_keys(state, model)
    assert gate_changes, "the gates-stage step moved no gate"
    assert not other_changes, f"the gates stage changed base tensors: {other_changes[:5]}"
    trained = run_model(model, x)

    # 3. save and load: the outputs are the trained model's, bit for bit
    ckpt = tmp_path / "trained.safetensors"
    save(model, ckpt, meta)
    if spec in EXPORTED:
        out = tmp_path / "export.safetensors"
        assert export(ckpt, out, input_size=[3, size, size]).gates == n_convs
        ckpt = out
    loaded = load(ckpt)
    assert len(gated_modules(loaded)) == n_convs
    _assert_equal(trained, run_model(loaded, x), "save/load round trip")
