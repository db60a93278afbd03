"""Export: every form reloads to what it claims, and a failed check writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import gct_surgery
from gct_surgery.io.checkpoint import read_metadata, save
from gct_surgery.io.export import VerificationError, export
from gct_surgery.operations import open_model, inject_model
from gct_surgery.core.surgery import gates, is_gate_parameter
from conftest import cli_here

SIZE = [3, 48, 48]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


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


def batch(n=2, seed=3, size=None):
    return torch.randn(n, *(size or SIZE), generator=torch.Generator().manual_seed(seed))


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


# --- the format follows the name; graph and folder forms that need no gct-surgery ------

def run_cli(cli, *args):
    """The command through its entry point in this process (the test above runs the
    installed one): no interpreter start-up."""
    return cli_here(*args)


def run_without_gct_surgery(script: str, cwd) -> subprocess.CompletedProcess:
    """A child Python where ``import gct_surgery`` fails: what a consumer without it sees."""
    guard = "import sys\nsys.modules['gct_surgery'] = None\n"
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(script)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_onnx_name_writes_onnx_that_matches_pytorch_at_any_batch_and_size(cli, trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    src, model = trained
    out = tmp_path / "m.onnx"
    done = run_cli(cli, "export", src, "-o", out, "--json")  # no --format: the name says ONNX
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["format"] == "onnx" and doc["max_abs_diff"] < 1e-4 and not doc["warnings"]
    assert doc["verified_input_shapes"] == [[2, *SIZE], [3, 3, 80, 64]]  # one of them not square
    onnx.checker.check_model(onnx.load(str(out)))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n, size in ((1, SIZE), (5, [3, 64, 96])):  # neither batch nor size it was exported with
        x = batch(n, seed=n, size=size)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        assert got.shape == (n, 10)
        assert (got - want).abs().max().item() < 1e-4


def test_format_that_contradicts_the_name_is_refused_in_one_line(cli, trained, tmp_path):
    src, _ = trained
    done = run_cli(cli, "export", src, "-o", tmp_path / "m.safetensors", "--format", "onnx")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line, = done.stderr.strip().splitlines()
    assert "--format onnx" in line and "m.safetensors" in line and "-o " + str(tmp_path / "m.onnx") in line
    # A name that says no format (the issue's `-o m.pt --unload`) is refused too, with the names to use.
    with pytest.raises(gct_surgery.UserError, match=r"m\.safetensors, .*m\.onnx or .*m\.pt2"):
        export(src, tmp_path / "m.pt", unload=True)
    with pytest.raises(gct_surgery.UserError, match="--format timm does not match"):
        export(src, tmp_path / "m.onnx", format="timm", unload=True)
    assert list(tmp_path.iterdir()) == []


def test_pt2_loads_in_plain_torch_at_any_batch_and_size(trained, tmp_path):
    src, model = trained
    out = tmp_path / "m.pt2"
    result = export(src, out)
    assert result.format == "pt2" and result.max_abs_diff < 1e-4 and not result.warnings
    assert result.input_shapes == [[2, *SIZE], [3, 3, 80, 64]]
    inputs = {n: batch(n, seed=10 + n, size=[3, 48 + 16 * n, 48]) for n in (1, 3)}
    with torch.no_grad():
        torch.save({n: (x, model(x)) for n, x in inputs.items()}, tmp_path / "io.pt")
    child = run_without_gct_surgery("""
        import torch
        try:
            import gct_surgery
            raise SystemExit("gct_surgery was importable")
        except ImportError:
            pass
        program = torch.export.load("m.pt2").module()
        for n, (x, want) in torch.load("io.pt").items():
            with torch.no_grad():
                got = program(x)
            print(n, tuple(got.shape), (got - want).abs().max().item())
    """, tmp_path)
    assert child.returncode == 0, child.stderr[-2000:]
    rows = [line.split(maxsplit=1) for line in child.stdout.splitlines()]
    assert [r[0] for r in rows] == ["1", "3"]
    for n, rest in rows:
        shape, diff = rest.rsplit(" ", 1)
        assert shape == f"({n}, 10)" and float(diff) < 1e-4


def test_unload_as_timm_folder_loads_through_timm_with_its_head(cli, tmp_path):
    names = [f"class-{i}" for i in range(10)]
    src = tmp_path / "named.safetensors"
    model = make_checkpoint(src, trained=True, seed=1)
    save(model, src, read_metadata(src), data={"class_names": names, "mean": [0.5] * 3, "std": [0.25] * 3})
    folder = tmp_path / "timm-model"
    done = run_cli(cli, "export", src, "-o", f"{folder}/", "--unload", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["format"] == "timm" and doc["files"] == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named.safetensors", "timm-model"]  # no temp left
    from gct_surgery.core.surgery import remove

    remove(model)  # what the folder should hold: the model without its gates
    x = batch(3, seed=5)
    with torch.no_grad():
        torch.save((x, model(x)), tmp_path / "io.pt")
    child = run_without_gct_surgery(f"""
        import timm, torch
        model = timm.create_model("local-dir:{folder}", pretrained=True).eval()
        x, want = torch.load("io.pt")
        with torch.no_grad():
            diff = (model(x) - want).abs().max().item()
        cfg = timm.data.resolve_data_config({{}}, model=model)
        print(model.num_classes, diff, list(cfg["input_size"]), list(cfg["std"]),
              model.pretrained_cfg["label_names"][9])
    """, tmp_path)
    assert child.returncode == 0, child.stderr[-2000:]
    classes, diff, *rest = child.stdout.split()
    assert int(classes) == 10 and float(diff) == 0.0
    assert " ".join(rest) == "[3, 48, 48] [0.25, 0.25, 0.25] class-9"


def test_timm_folder_refuses_gates_and_other_architectures(trained, tmp_path):
    src, model = trained
    with pytest.raises(gct_surgery.UserError, match=f"timm cannot build gates and this model has {len(gates(model))}; add --unload"):
        export(src, tmp_path / "gated", format="timm")
    with pytest.raises(gct_surgery.UserError, match="add --unload instead of --fold"):
        export(src, f"{tmp_path / 'kept'}/", fold=True)  # trained gammas are far from 0: kept
    tv = tmp_path / "tv.safetensors"
    model, meta = open_model("torchvision:squeezenet1_1", num_classes=4)
    inject_model(model, meta, output=tv, input_size=[3, 32, 32])
    with pytest.raises(gct_surgery.UserError, match="needs a timm architecture.*torchvision:squeezenet1_1.*tv-folder.pt2"):
        export(tv, f"{tmp_path / 'tv-folder'}/", unload=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.safetensors"]


def test_static_keeps_the_size_and_a_fixed_size_model_falls_back(trained, tmp_path):
    src, _ = trained
    result = export(src, tmp_path / "static.pt2", static=True)
    assert result.input_shapes == [[2, *SIZE], [3, *SIZE]] and not result.warnings
    program = torch.export.load(str(tmp_path / "static.pt2")).module()
    with pytest.raises(Exception):  # the height is fixed
        program(batch(2, size=[3, 64, 48]))
    # a head over flattened features takes one size only: said, and exported static
    from gct_surgery.operations import inject_model, open_model

    model, meta = open_model(f"{FIXTURES / 'seq_models.py'}:build_flat_cnn")
    meta.data["input_size"] = [3, 16, 16]
    result = inject_model(model, meta, input_size=[3, 16, 16])
    save(model, tmp_path / "flat.safetensors", result.meta)
    result = export(tmp_path / "flat.safetensors", tmp_path / "flat.pt2")
    assert result.input_shapes == [[2, 3, 16, 16], [3, 3, 16, 16]]
    assert "does not take other input sizes" in result.warnings[0] and "16x16" in result.warnings[0]
