"""Export: every form reloads to what it claims, and a failed check writes nothing."""
from __future__ import annotations

import json
import subprocess

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import gct_surgery
from gct_surgery.io.checkpoint import read_metadata, save
from gct_surgery.io.export import VerificationError, export
from gct_surgery.operations import open_model, inject_model
from gct_surgery.core.surgery import gates, is_gate_parameter

SIZE = [3, 48, 48]


def make_checkpoint(path, *, trained: bool, weights=None, seed: int = 0):
    """A gated resnet10t checkpoint; ``trained`` sets random gamma/beta (a trained gate)."""
    if weights is not None:
        model, meta = open_model(str(weights), arch="timm:resnet10t", num_classes=10)
    else:
        model, meta = open_model("timm:resnet10t", num_classes=10)
    meta.data["input_size"] = SIZE
    result = inject_model(model, meta, input_size=SIZE)
    if trained:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for gate in gates(model).values():
                gate.gamma.copy_(torch.randn(gate.gamma.shape, generator=g) * 0.5)
                gate.beta.copy_(torch.randn(gate.beta.shape, generator=g) * 0.5)
    save(model, path, result.meta)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "trained.safetensors"
    model = make_checkpoint(path, trained=True)
    return path, model


def batch(n=2, seed=3):
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_full_export_then_load_is_bit_for_bit(trained, tmp_path):
    src, model = trained
    out = tmp_path / "full.safetensors"
    result = export(src, out)
    assert result.max_abs_diff == 0.0 and result.gates == len(gates(model)) > 0
    loaded = gct_surgery.load(out)
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # Plain safetensors reads it too: every original name plus the gate tensors.
    plain = load_file(str(out))
    expected = model.state_dict()
    assert set(plain) == set(expected)
    assert all(torch.equal(plain[k], expected[k]) for k in expected)
    assert sum(is_gate_parameter(k) for k in plain) == 3 * len(gates(model))


def test_onnx_matches_pytorch_at_two_batch_sizes(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    src, model = trained
    out = tmp_path / "model.onnx"
    result = export(src, out, format="onnx")
    assert result.batch_sizes == [2, 3] and result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n in (1, 5):  # neither is the batch size it was exported with
        x = batch(n, seed=n)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        assert got.shape == (n, 10)
        assert (got - want).abs().max().item() < 1e-4


def test_unload_of_trained_gates_warns_by_how_much(trained, tmp_path):
    src, model = trained
    out = tmp_path / "unloaded.safetensors"
    result = export(src, out, unload=True)
    x = batch()
    plain = timm.create_model("resnet10t", num_classes=10).eval()
    plain.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        change = (plain(x) - model(x)).abs().max().item()
    assert change > 1e-3  # trained gates really did something
    assert result.unload_change > 1e-3
    assert len(result.warnings) == 1 and f"{result.unload_change:.4g}" in result.warnings[0]
    assert result.gates == 0 and read_metadata(out).gated == []


def test_unload_of_identity_gates_is_the_original_model(tmp_path):
    original = timm.create_model("resnet10t", num_classes=10).eval()
    weights = tmp_path / "base.safetensors"
    save_file(original.state_dict(), str(weights))
    src = tmp_path / "gated.safetensors"
    make_checkpoint(src, trained=False, weights=weights)
    out = tmp_path / "unloaded.safetensors"
    result = export(src, out, unload=True)
    assert result.unload_change == 0.0 and result.warnings == []
    # Strictly into timm's own architecture, and through timm's pretrained loader (which
    # keeps the head only when the overlay says how many classes the file has).
    strict = timm.create_model("resnet10t", num_classes=10).eval()
    strict.load_state_dict(load_file(str(out)), strict=True)
    via_timm = timm.create_model("resnet10t", num_classes=10, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(out), num_classes=10)).eval()
    x = batch()
    with torch.no_grad():
        want = original(x)
        assert torch.equal(strict(x), want)
        assert torch.equal(via_timm(x), want)


def test_failed_verification_writes_nothing(trained, tmp_path):
    src, _ = trained
    out = tmp_path / "bad.safetensors"
    # Folding gates whose gamma is far from 0 changes the output: the check refuses.
    with pytest.raises(VerificationError, match="does not reproduce"):
        export(src, out, fold=True, fold_tol=10.0)
    assert list(tmp_path.iterdir()) == []


def test_option_conflicts_are_user_errors(trained, tmp_path):
    src, _ = trained
    with pytest.raises(gct_surgery.UserError, match="at most one"):
        export(src, tmp_path / "x.safetensors", unload=True, fold=True)
    with pytest.raises(gct_surgery.UserError, match="no ONNX form"):
        export(src, tmp_path / "x.onnx", format="onnx", gates_only=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_json_and_user_error(cli, trained, tmp_path):
    src, _ = trained
    out = tmp_path / "full.safetensors"
    done = subprocess.run([cli, "export", str(src), "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["form"] == "full" and doc["max_abs_diff"] == 0.0 and out.is_file()
    missing = subprocess.run([cli, "export", str(tmp_path / "nope.safetensors"), "-o", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope.safetensors" in missing.stderr
