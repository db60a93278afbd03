"""Gates-only files: small, exact when re-applied to their base, refused on another base."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import gct_surgery
from gct_surgery.io.adapter import base_hash
from gct_surgery.io.checkpoint import read_metadata, save
from gct_surgery.errors import CheckpointError
from gct_surgery.io.export import export
from gct_surgery.operations import inject_model, open_model
from gct_surgery.core.surgery import gates, is_gate_parameter


def base_file(path, arch="resnet10t", seed=0, **kwargs):
    torch.manual_seed(seed)
    save_file(timm.create_model(arch, **kwargs).state_dict(), str(path))
    return path


def gated_checkpoint(path, weights, arch="resnet10t", size=(3, 48, 48), **kwargs):
    """Open a base weights file, inject, set random gates (a gates-stage result), save."""
    model, meta = open_model(str(weights), arch=f"timm:{arch}", **kwargs)
    meta.data["input_size"] = list(size)
    result = inject_model(model, meta, input_size=list(size))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.gamma.copy_(torch.randn(gate.gamma.shape, generator=g) * 0.5)
            gate.beta.copy_(torch.randn(gate.beta.shape, generator=g) * 0.5)
    save(model, path, result.meta)
    return model.eval(), result.meta


def run(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_resnet50_gates_only_is_tiny_and_exact(tmp_path):
    weights = base_file(tmp_path / "base.safetensors", "resnet50")
    src = tmp_path / "gated.safetensors"
    model, _ = gated_checkpoint(src, weights, "resnet50", size=(3, 64, 64))  # 32 px: 1x1 layer4 inputs
    out = tmp_path / "gates.safetensors"
    result = export(src, out, gates_only=True)  # base: the recorded weights file
    full_size = src.stat().st_size
    assert full_size > 90e6
    assert out.stat().st_size < 0.01 * full_size
    assert result.max_abs_diff == 0.0 and result.base == str(weights)
    tensors = load_file(str(out))
    assert len(tensors) == 3 * 53 and all(is_gate_parameter(k) for k in tensors)
    rebuilt = gct_surgery.load(base=str(weights), gates=out)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(run(rebuilt, x), run(model, x))


def test_mismatched_base_is_refused(tmp_path):
    weights = base_file(tmp_path / "base.safetensors", num_classes=10)
    other = base_file(tmp_path / "other.safetensors", seed=1, num_classes=10)
    src = tmp_path / "gated.safetensors"
    gated_checkpoint(src, weights, num_classes=10)
    out = tmp_path / "gates.safetensors"
    export(src, out, gates_only=True)
    with pytest.raises(CheckpointError, match="other.safetensors is not the base"):
        gct_surgery.load(base=str(other), gates=out)
    # An nn.Module base is checked the same way.
    wrong = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(CheckpointError, match="hash"):
        gct_surgery.load(base=wrong, gates=out)
    right = timm.create_model("resnet10t", num_classes=10)
    right.load_state_dict(load_file(str(weights)))
    assert gates(gct_surgery.load(base=right, gates=out))


def test_changed_head_and_bn_statistics_travel_with_the_gates(tmp_path):
    weights = base_file(tmp_path / "base.safetensors", num_classes=10)
    src = tmp_path / "gated.safetensors"
    model, meta = gated_checkpoint(src, weights, num_classes=10)
    with torch.no_grad():  # what a full stage leaves: a new head, updated BN statistics
        model.fc.weight.add_(0.1)
        model.bn1.running_mean.add_(0.5)
    save(model, src, meta)
    out = tmp_path / "gates.safetensors"
    export(src, out, gates_only=True)
    stored = {k for k in load_file(str(out)) if not is_gate_parameter(k)}
    assert stored == {"fc.weight", "bn1.running_mean"}
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(run(gct_surgery.load(base=str(weights), gates=out), x), run(model, x))
    assert read_metadata(out).base_hash == base_hash(load_file(str(weights)))


def test_random_init_base_needs_an_explicit_base(tmp_path):
    model, meta = open_model("timm:resnet10t", num_classes=10)
    meta.data["input_size"] = [3, 32, 32]
    result = inject_model(model, meta, input_size=[3, 32, 32])
    src = tmp_path / "gated.safetensors"
    save(model, src, result.meta)
    with pytest.raises(CheckpointError, match="random initial weights.*--base"):
        export(src, tmp_path / "gates.safetensors", gates_only=True)
    # Naming the base explicitly works: here, the checkpoint's own weights, unloaded.
    base = tmp_path / "base.safetensors"
    export(src, base, unload=True)
    result = export(src, tmp_path / "gates.safetensors", gates_only=True, base=str(base))
    assert result.base == str(base) and result.max_abs_diff == 0.0


def test_full_checkpoint_is_not_a_gates_file(tmp_path):
    weights = base_file(tmp_path / "base.safetensors", num_classes=10)
    src = tmp_path / "gated.safetensors"
    gated_checkpoint(src, weights, num_classes=10)
    with pytest.raises(CheckpointError, match="not a gates-only file"):
        gct_surgery.load(base=str(weights), gates=src)
