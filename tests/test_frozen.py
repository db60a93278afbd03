"""The frozen base of the gates stage (``gct_surgery.train.frozen``): same function as the
ordinary path, fewer saved tensors, state dict untouched, exact classes back on exit.

Real small timm models (resnet18, resnet10t, mobilenetv3 with depthwise convs) at
48 px, with gates and BN statistics moved away from their initial values so that a
wrong fold or a wrong input gradient shows up.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from gct_surgery.cli import run as cli_run
from gct_surgery.train.frozen import FrozenConvMixin, frozen_base
from gct_surgery.train.stages import Stage, freeze_for_stage, set_train_mode
from gct_surgery.core.surgery import inject

GATES = Stage("gates", "gates")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference of ``a`` from ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gated_model(name: str, seed: int = 0) -> nn.Module:
    """A gated timm model in gates-stage mode, gates and BN statistics not at init."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=5)
    inject(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate.gamma", "gate.beta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    freeze_for_stage(model, GATES)
    set_train_mode(model, GATES)
    return model


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, gradients of what trains, and bytes of activations saved for backward."""
    constants = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in constants:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads, sum(saved.values())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["resnet18", "resnet10t", "mobilenetv3_small_050"])
def test_same_outputs_and_gate_gradients_fewer_saved_bytes(name):
    model = gated_model(name)
    x = torch.randn(2, 3, 48, 48)
    classes = {n: type(m) for n, m in model.named_modules()}
    before = snapshot(model)
    y0, g0, saved0 = step(model, x)
    assert g0 and all(".gate." in n for n in g0)  # only gates train in this stage

    with frozen_base(model) as frozen:
        assert not frozen.folded  # learnt on the first forward, by a dry run before it
        y1, g1, saved1 = step(model, x)
        assert frozen.folded, "no BN was folded"
        assert all(model.get_submodule(c).__class__.__name__.startswith("FrozenConv") for c in frozen.folded)
        assert_same_state(model, before)  # checkpoints written mid-stage see the originals
        y2, g2, _ = step(model, x)
    assert torch.equal(y1, y2) and all(torch.equal(g1[n], g2[n]) for n in g1)  # same path each time

    assert relative(y1, y0) < 1e-5
    assert g1.keys() == g0.keys()
    for n in g0:
        assert relative(g1[n], g0[n]) < 1e-5, n
    assert saved1 < 0.6 * saved0, (saved1, saved0)
    assert {n: type(m) for n, m in model.named_modules()} == classes  # the exact classes
    assert not any("_gct_frozen" in vars(m) for m in model.modules())
    assert_same_state(model, before)


def test_the_dry_run_leaves_modes_and_random_state_alone():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, drop_rate=0.5)  # dropout in train mode
    inject(model)
    freeze_for_stage(model, GATES)
    set_train_mode(model, GATES)
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    y0 = model(x)
    torch.manual_seed(1)
    with frozen_base(model) as frozen:
        y1 = model(x)
        assert frozen.folded
        assert {n: m.training for n, m in model.named_modules()} == modes
    assert relative(y1, y0) < 1e-5  # the same dropout mask: no random number was drawn


def test_depthwise_convs_fold():
    model = gated_model("mobilenetv3_small_050")
    with frozen_base(model) as frozen:
        step(model, torch.randn(1, 3, 32, 32))
        folded = [model.get_submodule(c) for c in frozen.folded]
    assert any(c.groups > 1 and c.groups == c.in_channels for c in folded)


class Block(nn.Module):
    """One conv of the given geometry, then a frozen BN, input requiring grad."""

    def __init__(self, conv: nn.Module, out_ch: int, norm: type) -> None:
        super().__init__()
        self.conv, self.bn = conv, norm(out_ch)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


@pytest.mark.parametrize("dims,kwargs", [
    (2, dict(kernel_size=3, stride=2, padding=1)),
    (2, dict(kernel_size=1, stride=2)),                   # strided 1x1 (a downsample)
    (2, dict(kernel_size=3, padding=2, dilation=2, groups=2)),
    (2, dict(kernel_size=5, padding=2, groups=4)),        # depthwise
    (2, dict(kernel_size=(1, 3), padding=(0, 1), bias=True)),
    (1, dict(kernel_size=3, stride=2, padding=1)),
    (3, dict(kernel_size=1)),
])
def test_input_gradient_of_every_conv_geometry_in_float64(dims, kwargs):
    conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    torch.manual_seed(0)
    block = Block(conv_cls(4, 4, **kwargs), 4, norm).double()
    with torch.no_grad():
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2)
        block.bn.weight.normal_()
    block.requires_grad_(False).eval()
    x = torch.randn((2, 4) + (7,) * dims, dtype=torch.float64, requires_grad=True)
    y0 = block(x)
    (dx0,) = torch.autograd.grad(y0.square().sum(), x)
    with frozen_base(block) as frozen:
        block(x.detach())
        assert frozen.folded == {"conv": "bn"}
        assert torch.autograd.gradcheck(block, (x,))
        y1 = block(x)
        (dx1,) = torch.autograd.grad(y1.square().sum(), x)
    assert relative(y1, y0) < 1e-12 and relative(dx1, dx0) < 1e-12


def test_channels_last():
    model = gated_model("resnet10t").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 48, 48).to(memory_format=torch.channels_last)
    y0, g0, _ = step(model, x)
    with frozen_base(model):
        step(model, x)
        y1, g1, _ = step(model, x)
    assert relative(y1, y0) < 1e-5
    assert max(relative(g1[n], g0[n]) for n in g0) < 1e-5


def test_bf16_autocast_trains_the_gates():
    model = gated_model("resnet10t")
    x = torch.randn(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, g0, _ = step(model, x)
        with frozen_base(model):
            step(model, x)
            y1, g1, _ = step(model, x)
    assert y1.dtype == y0.dtype
    assert relative(y1, y0) < 0.05  # bf16 rounding, folded in another order
    for n in g0:
        assert g1[n].dtype == g0[n].dtype == torch.float32 and torch.isfinite(g1[n]).all()
        assert relative(g1[n], g0[n]) < 0.1, n


class SharedOutput(nn.Module):
    """conv1's output feeds bn1 *and* the residual sum: bn1 must not fold into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(h))) + h


def test_a_conv_output_read_elsewhere_is_not_folded():
    model = SharedOutput().eval().requires_grad_(False)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y0 = model(x)
    with frozen_base(model) as frozen:
        model(x)
        assert frozen.folded == {"conv2": "bn2"}
        y1 = model(x)
    assert relative(y1, y0) < 1e-6


def test_training_bn_and_trainable_convs_keep_the_ordinary_path():
    model = gated_model("resnet10t")
    model.train()  # BN statistics update: nothing may fold
    model.requires_grad_(True)  # and every conv trains: no cheap conv either
    x = torch.randn(2, 3, 32, 32)
    reference = gated_model("resnet10t")
    reference.train()
    reference.requires_grad_(True)
    with frozen_base(model) as frozen:
        y1, g1, _ = step(model, x)
        step(model, x)
        assert frozen.folded and not any(plan.folds() for plan in frozen.plans.values())
    y0, g0, _ = step(reference, x)
    step(reference, x)
    assert relative(y1, y0) < 1e-6
    assert g1.keys() == g0.keys() and any(n.endswith("conv1.weight") for n in g1)
    for k, v in reference.state_dict().items():  # running statistics moved alike
        assert torch.allclose(model.state_dict()[k], v, rtol=1e-5, atol=1e-6), k


def test_convs_it_does_not_cover_run_as_usual():
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding="same"), nn.BatchNorm2d(4)).eval().requires_grad_(False)
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    y0 = model(x)
    with frozen_base(model) as frozen:
        assert frozen.convs == 0
        assert not any(isinstance(m, FrozenConvMixin) for m in model.modules())
        assert torch.equal(model(x), y0)


def test_restored_after_an_exception_and_under_ddp_style_wrapping():
    model = gated_model("resnet10t")
    classes = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match="stop"):
        with frozen_base(model):
            model(torch.randn(1, 3, 32, 32))
            raise RuntimeError("stop")
    assert [type(m) for m in model.modules()] == classes
    wrapped = nn.DataParallel(model)  # frozen_base works on the module inside
    with frozen_base(wrapped) as frozen:
        assert frozen.model is model and frozen.convs > 0
    assert [type(m) for m in model.modules()] == classes


# --- in a run -----------------------------------------------------------------------

def write_images(root: Path, classes: int = 2, train: int = 4, val: int = 2) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_gates_stage_with_and_without_it_agree_and_keep_the_base(tmp_path):
    from gct_surgery.operations import inject_model, open_model

    model, meta = open_model("timm:resnet10t", num_classes=2)
    ckpt = tmp_path / "gated.safetensors"
    inject_model(model, meta, output=ckpt, input_size=[3, 32, 32])
    data = write_images(tmp_path / "data")
    gates = {}
    for flag in ("--fast-frozen", "--no-fast-frozen"):
        out = tmp_path / flag.strip("-")
        assert cli_run(["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--stage", "gates",
                        "--epochs", "2", "--lr", "0.05", "--batch-size", "4", "--workers", "0",
                        "--img-size", "32", "--no-aug", flag, "--json"]) == 0
        assert json.loads((out / "run.json").read_text())["config"]["fast_frozen"] == (flag == "--fast-frozen")
        before, after = load_file(ckpt), load_file(out / "last.safetensors")
        assert before.keys() == after.keys()
        for k in before:
            if ".gate." not in k:
                assert torch.equal(before[k], after[k]), k
        gates[flag] = {k: v for k, v in after.items() if ".gate." in k}
        assert any(not torch.equal(v, before[k]) for k, v in gates[flag].items())
    fast, plain = gates["--fast-frozen"], gates["--no-fast-frozen"]
    for k in fast:
        assert torch.allclose(fast[k], plain[k], rtol=1e-4, atol=1e-6), k
