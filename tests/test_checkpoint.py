"""The self-describing checkpoint: round trip, metadata, plain readers, sources."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gct_surgery
from gct_surgery.io.checkpoint import read_metadata
from gct_surgery.io.metadata import FORMAT_VERSION, METADATA_KEY
from gct_surgery.errors import CheckpointError, SourceError
from gct_surgery.operations import inject_model, open_model


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    """A resnet18 state dict with seeded, non-default weights (as if trained)."""
    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_round_trip_is_bit_exact_and_plain_readers_read_it(tmp_path, r18_weights):
    weights, original = r18_weights
    model, meta = open_model(str(weights), arch="timm:resnet18")
    result = inject_model(model, meta, output=tmp_path / "g.safetensors", input_size=[3, 64, 64])
    assert result.max_abs_diff == 0.0 and result.report.gates_added == 20

    loaded = gct_surgery.load(tmp_path / "g.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))

    tensors = load_file(str(tmp_path / "g.safetensors"))  # any safetensors reader
    assert "conv1.weight" in tensors and "conv1.gate.beta" in tensors
    assert torch.equal(tensors["conv1.weight"], original.conv1.weight)
    # the original state dict loads with only gate keys missing
    fresh = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert unexpected and all(".gate." in k for k in unexpected)
    assert missing == []


def test_metadata_describes_the_model(tmp_path):
    model, meta = open_model("timm:resnet18", num_classes=7)
    inject_model(model, meta, output=tmp_path / "m.safetensors", input_size=[3, 64, 64])
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
    assert doc["format"] == "gct-surgery" and doc["format_version"] == FORMAT_VERSION
    assert doc["source"] == {"spec": "timm:resnet18", "kwargs": {"num_classes": 7}}
    assert doc["gate"] == {"mode": "l2", "eps": 1e-5, "after_relu": False}
    assert len(doc["gated"]) == 20 and doc["gated"][0] == "conv1"
    assert [e["action"] for e in doc["history"]] == ["open", "inject"]
    assert doc["history"][1]["max_abs_diff"] == 0.0 and "time" in doc["history"][1]
    assert doc["data"]["input_size"] == [3, 64, 64]  # --input-size is recorded for later commands
    assert doc["data"]["mean"] == [0.485, 0.456, 0.406]  # from timm's pretrained config
    assert gct_surgery.load(tmp_path / "m.safetensors").get_classifier().out_features == 7


def test_reinjecting_a_checkpoint_is_idempotent(tmp_path):
    model, meta = open_model("timm:resnet10t")
    inject_model(model, meta, output=tmp_path / "a.safetensors", input_size=[3, 32, 32])
    model2, meta2 = open_model(str(tmp_path / "a.safetensors"))
    result = inject_model(model2, meta2, output=tmp_path / "b.safetensors", input_size=[3, 32, 32])
    assert result.report.gates_added == 0
    assert result.report.gates_total == len(read_metadata(tmp_path / "a.safetensors").gated)
    assert [e["action"] for e in read_metadata(tmp_path / "b.safetensors").history] == [
        "open", "inject", "inject"]


@pytest.mark.parametrize("wrap", ["state_dict", "model", "ddp", "safetensors"])
def test_state_dict_files_in_common_wrappings(tmp_path, r18_weights, wrap):
    _, original = r18_weights
    sd = original.state_dict()
    if wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        if wrap == "ddp":
            obj = {f"module.{k}": v for k, v in sd.items()}
        else:
            obj = {wrap: sd, "epoch": 3}
        torch.save(obj, path)
    model, _ = open_model(str(path), arch="timm:resnet18")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_state_dict_file_without_arch_says_what_to_do(tmp_path, r18_weights):
    weights, _ = r18_weights
    with pytest.raises(SourceError, match="--arch"):
        open_model(str(weights))


def test_timm_pretrained_from_a_local_file(r18_weights):
    weights, original = r18_weights
    model, meta = open_model("timm:resnet18", pretrained=True, weights=str(weights))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))
    assert meta.history[0]["pretrained"] is True


def test_timm_pretrained_offline_names_the_local_file_option():
    with pytest.raises(SourceError, match="--weights"):
        open_model("timm:resnet18", pretrained=True)


def test_torchvision_source_with_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model, meta = open_model("torchvision:resnet18", weights=str(tmp_path / "tv.pth"), num_classes=5)
    result = inject_model(model, meta, output=tmp_path / "tv.safetensors", input_size=[3, 64, 64])
    assert result.report.gates_added == 20  # at 32 px layer4 sees 1x1 inputs, not gated
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gct_surgery.load(tmp_path / "tv.safetensors")(x), ref(x))


def test_factory_source(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn\n"
        "def build(width=8):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),\n"
        "                         nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(width, 2))\n")
    model, meta = open_model(f"{tmp_path}/mynet.py:build")
    result = inject_model(model, meta, output=tmp_path / "f.safetensors")
    assert result.report.gates_added == 2 and result.max_abs_diff == 0.0
    assert meta.data["input_size"] == [3, 224, 224]
    loaded = gct_surgery.load(tmp_path / "f.safetensors")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_unknown_models_are_source_errors():
    with pytest.raises(SourceError, match="unknown timm model 'resnet1x'"):
        open_model("timm:resnet1x")
    with pytest.raises(SourceError, match="unknown torchvision model"):
        open_model("torchvision:notamodel")


def test_tied_weights_round_trip(tmp_path):
    (tmp_path / "tied.py").write_text(
        "import torch.nn as nn\n"
        "class Tied(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(4, 4, 3, padding=1)\n"
        "        self.b = self.a\n"
        "    def forward(self, x):\n"
        "        return self.b(self.a(x).relu())\n"
        "def build():\n"
        "    return Tied()\n")
    model, meta = open_model(f"{tmp_path}/tied.py:build")
    inject_model(model, meta, output=tmp_path / "t.safetensors", input_size=[4, 8, 8])
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        header = f.metadata()
    dropped = {k: v for k, v in header.items() if k != METADATA_KEY}  # save_model's record
    assert len(dropped) == 5 and read_metadata(tmp_path / "t.safetensors").aliases == dropped
    loaded = gct_surgery.load(tmp_path / "t.safetensors")
    assert loaded.a is loaded.b and loaded.a.gate is loaded.b.gate
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # A file written before save_model: the dropped keys listed in the document's "aliases".
    doc = {**json.loads(header[METADATA_KEY]), "aliases": dropped}
    save_file(load_file(str(tmp_path / "t.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={METADATA_KEY: json.dumps(doc)})
    with torch.no_grad():
        assert torch.equal(gct_surgery.load(tmp_path / "old.safetensors")(x), model(x))


def test_plain_safetensors_is_not_a_gct_checkpoint(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a gct-surgery checkpoint"):
        gct_surgery.load(tmp_path / "plain.safetensors")
