"""inspect: one row per gate, the competition/cooperation shares, real gate values, a PNG."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import gct_surgery.cli
from gct_surgery.analysis import gate_values
from gct_surgery.io.checkpoint import save
from gct_surgery.operations import inject_model, open_model
from gct_surgery.core.surgery import gates, inject

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A gated resnet10t whose gates have random gamma (both signs) and beta."""
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)  # timm's init: unseeded, a gate could saturate at exactly 0 or 2
    model, meta = open_model("timm:resnet10t", num_classes=10)
    meta.data.update(input_size=[3, 40, 40], crop_pct=1.0)
    result = inject_model(model, meta, input_size=[3, 40, 40])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.gamma.copy_(torch.randn(gate.gamma.shape, generator=g))
            gate.beta.copy_(torch.randn(gate.beta.shape, generator=g) * 0.3)
    path = root / "gated.safetensors"
    save(model, path, result.meta)
    return path, model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_inspect_writes_png_and_one_json_row_per_gate(checkpoint, images, tmp_path, capsys):
    path, model = checkpoint
    png, doc_path = tmp_path / "gates.png", tmp_path / "gates.json"
    code = gct_surgery.cli.run(["inspect", str(path), "--data", str(images), "--plot", str(png),
                                "--out-json", str(doc_path), "--max-images", "4"])
    assert code == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    doc = json.loads(doc_path.read_text())
    gate_map = gates(model)
    assert doc["gates"] == len(doc["rows"]) == len(gate_map) == 14
    assert doc["images"] == 4
    for depth, (row, (name, gate)) in enumerate(zip(doc["rows"], gate_map.items())):
        gamma = gate.gamma.detach().reshape(-1)
        assert row["depth"] == depth and row["module"] == name and row["channels"] == gamma.numel()
        assert row["competition"] == pytest.approx((gamma > 0).float().mean().item())
        assert row["cooperation"] == pytest.approx((gamma < 0).float().mean().item())
        assert row["gamma_max"] == pytest.approx(gamma.max().item())
        assert 0.0 < row["gate_min"] <= row["gate_p50"] <= row["gate_max"] < 2.0


def test_gate_values_match_the_gate_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3))
    inject(model)
    gate = model[0].gate
    with torch.no_grad():
        gate.gamma.normal_()
        gate.beta.normal_()
    x = torch.randn(2, 3, 9, 9)
    found = gate_values(model, x)["0"].reshape(2, 3)
    # y / x at any element is the gate of that (sample, channel).
    with torch.no_grad():
        expected = (gate(x) / x)[:, :, 4, 4].double()
    assert torch.allclose(found, expected, atol=1e-5)
    assert not torch.allclose(found, torch.ones_like(found), atol=1e-2)
    assert found.min() > 0 and found.max() < 2


def test_inspect_json_on_stdout_without_data(cli, checkpoint):
    path, _ = checkpoint
    done = subprocess.run([cli, "inspect", str(path), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len(doc["rows"]) == 14 and doc["images"] == 0
    assert "gate_p50" not in doc["rows"][0]


def test_bad_data_folder_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert gct_surgery.cli.run(["inspect", str(path), "--data", str(tmp_path / "none")]) == 2
    assert "no such data folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert gct_surgery.cli.run(["inspect", str(path), "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "0 images" in err and len(err.strip().splitlines()) == 1


# --- the verdict: have the gates done anything? ------------------------------------

def test_verdict_on_identity_barely_moved_and_active_gates():
    from gct_surgery.analysis import analyse

    model, _ = open_model("timm:resnet10t", num_classes=10)
    inject(model)
    identity = analyse(model).verdict
    n = identity["gates"]
    assert identity["state"] == "identity" and "identity" in identity["text"]
    assert identity["foldable"] == {"1e-06": n, "0.001": n, "0.01": n}
    assert "no cooperation/competition reading" in identity["reading"]

    gs = list(gates(model).values())
    with torch.no_grad():
        for gate in gs:
            gate.gamma.fill_(0.005)  # a sign, but no effect worth reading
    small = analyse(model).verdict
    assert small["state"] == "barely moved" and small["max_abs_gamma"] == pytest.approx(0.005)
    assert small["foldable"] == {"1e-06": 0, "0.001": 0, "0.01": n}
    assert "no cooperation/competition reading" in small["reading"]

    with torch.no_grad():
        gs[0].gamma.fill_(-0.5)   # shallow: cooperation
        gs[-1].gamma.fill_(0.5)   # deep: competition
    active = analyse(model).verdict
    assert active["state"] == "active" and active["active_gates"] == 2
    c0, c1 = gs[0].gamma.numel(), gs[-1].gamma.numel()
    assert f"shallow half: 0 channels compete, {c0} cooperate" in active["reading"]
    assert f"deep half: {c1} channels compete, 0 cooperate" in active["reading"]


def test_cli_prints_the_verdict(checkpoint, capsys):
    path, _ = checkpoint
    assert gct_surgery.cli.run(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gates active" in out and "would fold" in out and "compete" in out


def test_img_size_reads_the_images_at_another_size(checkpoint, images):
    from gct_surgery.analysis import inspect_checkpoint, load_images

    path, _ = checkpoint
    assert load_images(images, {"input_size": [3, 40, 40], "crop_pct": 1.0}, 2,
                       img_size=64).shape == (2, 3, 64, 64)
    recorded = inspect_checkpoint(path, data=images, limit=2)
    larger = inspect_checkpoint(path, data=images, limit=2, img_size=64)
    assert recorded.rows[0]["gate_p50"] != larger.rows[0]["gate_p50"]
