"""Weights that do not fit the model: each message names the first mismatching keys
and shapes and says what to do (--arch, --num-classes, --in-chans, inject...)."""
from __future__ import annotations

import subprocess

import pytest
import timm
import torch
from safetensors.torch import save_file

import gct_surgery
from conftest import cli_path
from gct_surgery.cli import run
from gct_surgery.errors import CheckpointError, UserError
from gct_surgery.operations import inject_model, open_model
from gct_surgery.io.state_dicts import load_weights


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """timm resnet18 weights with a 10-class head, as a torch file and as safetensors."""
    folder = tmp_path_factory.mktemp("r18")
    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    torch.save(state, folder / "r18.pth")
    save_file(state, str(folder / "r18.safetensors"))
    return folder


def cli_error(argv, capsys) -> str:
    """Run the CLI in-process; it must fail as a user error with exactly one line."""
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_class_count_mismatch_says_num_classes(r18, tmp_path, capsys):
    line = cli_error(["inject", str(r18 / "r18.pth"), "--arch", "timm:resnet18", "--num-classes", "1000",
                      "-o", str(tmp_path / "o.safetensors")], capsys)
    assert "classifier has 10 classes and the model's 1000" in line
    assert "fc.weight: file [10, 512], model [1000, 512]" in line
    assert line.endswith("pass --num-classes 10")
    assert run(["inject", str(r18 / "r18.pth"), "--arch", "timm:resnet18", "--num-classes", "10",
                "-o", str(tmp_path / "o.safetensors"), "--input-size", "3,32,32"]) == 0


def test_wrong_arch_resnet34(r18, tmp_path, capsys):
    line = cli_error(["inject", str(r18 / "r18.safetensors"), "--arch", "timm:resnet34",
                      "--num-classes", "10", "-o", str(tmp_path / "o.safetensors")], capsys)
    assert "looks like weights for another architecture" in line
    assert "missing keys (layer1.2.conv1.weight [64, 64, 3, 3]" in line
    assert "Pass the --arch it was trained with" in line


def test_torchvision_resnet18_shares_timm_key_names(r18):
    """timm's and torchvision's resnet18 name every key alike: this must just load."""
    model, _ = open_model(str(r18 / "r18.pth"), arch="torchvision:resnet18", num_classes=10)
    ref = timm.create_model("resnet18", num_classes=10).eval()
    ref.load_state_dict(torch.load(r18 / "r18.pth", weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x))


def test_same_model_other_library_names_keys_differently(tmp_path, capsys):
    torch.save(timm.create_model("mobilenetv3_small_100", num_classes=10).state_dict(), tmp_path / "m.pth")
    line = cli_error(["inject", str(tmp_path / "m.pth"), "--arch", "torchvision:mobilenet_v3_small",
                      "--num-classes", "10", "-o", str(tmp_path / "o.safetensors")], capsys)
    assert "looks like weights for another architecture: only 0 of the model's" in line
    assert "features.0.0.weight [16, 3, 3, 3]" in line  # the model's first missing key, with shape
    assert "conv_stem.weight [16, 3, 3, 3]" in line  # the file's first unexpected key
    assert "timm and torchvision name the same model's keys differently" in line


def small_model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()


def test_missing_and_unexpected_keys_are_named_with_shapes():
    model = small_model()
    state = model.state_dict()
    first = next(iter(state))
    del state[first]
    state["extra.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, state, what="w.pth")
    msg = str(err.value)
    assert f"1 missing keys ({first} {list(model.state_dict()[first].shape)})" in msg
    assert "1 unexpected keys (extra.weight [3, 2])" in msg
    assert "Check --arch" in msg


def test_shape_mismatch_is_named():
    model = small_model()
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.ndim == 4 and k != "conv1.weight" and "stem" not in k)
    want = list(state[key].shape)
    state[key] = torch.zeros(want[0] + 1, *want[1:])
    with pytest.raises(CheckpointError, match=rf"1 shape mismatches \({key}: file \[{want[0] + 1}, "):
        load_weights(model, state, what="w.pth")


def test_in_chans_mismatch_says_in_chans(tmp_path, capsys):
    torch.save(timm.create_model("test_resnet", in_chans=1, num_classes=4).state_dict(), tmp_path / "g.pth")
    line = cli_error(["inject", str(tmp_path / "g.pth"), "--arch", "timm:test_resnet", "--num-classes", "4",
                      "-o", str(tmp_path / "o.safetensors")], capsys)
    assert "takes 1 input channels and the model's 3" in line and line.endswith("pass --in-chans 1")


def test_extra_prefix_is_stripped_and_leftover_keys_named(tmp_path):
    state = {f"backbone.{k}": v for k, v in small_model().state_dict().items()}
    torch.save({**state, "backbone.extra.weight": torch.zeros(3, 2)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(extra.weight \[3, 2\]\)"):
        open_model(str(tmp_path / "w.pth"), arch="timm:test_resnet", num_classes=4)


def test_gated_state_dict_into_an_ungated_model(tmp_path):
    model, meta = open_model("timm:test_resnet", num_classes=4)
    inject_model(model, meta, input_size=[3, 32, 32])
    torch.save(model.state_dict(), tmp_path / "gated.pth")
    with pytest.raises(CheckpointError, match="gate tensors .* the model has no gates for: open it as "
                                              "the gct-surgery checkpoint"):
        open_model(str(tmp_path / "gated.pth"), arch="timm:test_resnet", num_classes=4)


def test_plain_safetensors_where_a_gct_checkpoint_is_required(r18, tmp_path):
    with pytest.raises(CheckpointError) as err:
        gct_surgery.load(r18 / "r18.safetensors")
    msg = str(err.value)
    assert "not a gct-surgery checkpoint" in msg and "--arch timm:NAME" in msg and "gct-surgery inject" in msg
    proc = subprocess.run([cli_path(), "inject", str(r18 / "r18.safetensors"), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {r18 / 'r18.safetensors'} is not a gct-surgery checkpoint; if it holds a plain state "
        "dict, say which model it is for with --arch timm:NAME, torchvision:NAME or file.py:factory"]


def test_torch_file_where_a_gct_checkpoint_is_required(r18):
    with pytest.raises(CheckpointError, match="torch.save zip file; a plain state dict goes with --arch"):
        gct_surgery.load(r18 / "r18.pth")


def test_gates_only_file_on_another_base(tmp_path):
    adapter = pytest.importorskip("gct_surgery.io.adapter")
    base = small_model()
    other = timm.create_model("test_resnet", pretrained=False, num_classes=4)  # other random weights
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    model, meta = open_model(str(tmp_path / "base.safetensors"), arch="timm:test_resnet", num_classes=4)
    meta = inject_model(model, meta, input_size=[3, 32, 32]).meta
    adapter.save_adapter(model, meta, base, tmp_path / "gates.safetensors", base_name="base.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(adapter.apply_adapter(tmp_path / "gates.safetensors", base)(x), model.eval()(x))
    with pytest.raises(UserError, match="is not the base .* was made for"):
        adapter.apply_adapter(tmp_path / "gates.safetensors", other)
    with pytest.raises(CheckpointError, match="gates-only"):
        gct_surgery.load(tmp_path / "gates.safetensors")
