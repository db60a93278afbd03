"""Users' own models: a U^2-Net-style saliency net, weight tying, functional convs,
and models beyond images (Conv1d sequences, Conv3d clips).

Each goes through the public paths a user takes: ``path/to/file.py:factory`` with a
weights file, inject (identity), a gates-stage training step, export, load.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from fixtures import FIXTURES, changed_keys, gates_stage_step, snapshot
from gct_surgery import load
from gct_surgery.io.checkpoint import read_metadata, save
from gct_surgery.io.export import export
from gct_surgery.core.model import run_model
from gct_surgery.operations import inject_model, open_model
from gct_surgery.core.surgery import gated_modules, gates
from gct_surgery.core.targets import select_targets, watch_convs

U2NET = f"{FIXTURES / 'u2net.py'}:build_u2net_small"
SEQ = FIXTURES / "seq_models.py"


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _trained_weights(factory, path, **kwargs):
    """A 'trained' model: random weights and non-trivial BN statistics, saved as a user would."""
    torch.manual_seed(0)
    model = factory(**kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model.eval()


# --- U^2-Net through the CLI and the --task hook ---------------------------------------

def test_u2net_factory_file_through_cli_task_hook_and_export(cli, tmp_path):
    from fixtures.u2net import build_u2net_small

    original = _trained_weights(build_u2net_small, tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in original.modules())

    gated = tmp_path / "gated.safetensors"
    run = subprocess.run([cli, "inject", U2NET, "--weights", str(tmp_path / "w.pt"),
                          "-o", str(gated), "--input-size", "3,32,32", "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["gates_added"] == n_convs == 5 * 8 + 3 + 1  # 5 U-blocks of 8, sides, fuse
    assert report["max_abs_diff"] == 0.0 and report["functional_convs"] == []
    # The checkpoint holds the user's weights and the identity gates: same outputs.
    assert _equal(run_model(original, x), run_model(load(gated), x))

    # One gates-stage epoch through the --task hook, on PNGs on disk.
    from fixtures.ownnet.salnet_data import write_saliency_folder

    data = write_saliency_folder(tmp_path / "data")
    out = tmp_path / "run"
    run = subprocess.run([cli, "finetune", str(gated), "--data", str(data), "-o", str(out),
                          "--task", f"{FIXTURES / 'u2net.py'}:SaliencyTask", "--stage", "gates",
                          "--epochs", "1", "--lr", "0.05", "--batch-size", "2", "--workers", "0",
                          "--device", "cpu", "--no-aug"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    trained_path = out / "last.safetensors"
    trained = load(trained_path)
    base = load(gated)
    gate_changes, other_changes = changed_keys(snapshot(base), trained)
    assert gate_changes and not other_changes, other_changes[:5]

    # Export and load: the trained outputs, bit for bit.
    exported = tmp_path / "export.safetensors"
    export(trained_path, exported, input_size=[3, 32, 32])
    assert _equal(run_model(trained, x), run_model(load(exported), x))


# --- weight tying and functional convs --------------------------------------------------

def test_a_conv_shared_at_two_places_gets_one_gate_and_round_trips(tmp_path):
    from fixtures.u2net import build_u2net_small

    # The factory's kwargs are recorded in the checkpoint, so loading rebuilds the tie.
    _, meta_tied = open_model(U2NET)
    tied = build_u2net_small(tied_decoder=True).eval()
    meta_tied.source["kwargs"] = {"tied_decoder": True}
    assert tied.stage1d is tied.stage2d
    unique = len({id(m) for m in tied.modules() if isinstance(m, torch.nn.Conv2d)})

    result = inject_model(tied, meta_tied, input_size=[3, 32, 32])
    assert result.max_abs_diff == 0.0
    assert len(gates(tied)) == result.report.gates_total == unique
    assert tied.stage1d.rebnconvin.conv_s1.gate is tied.stage2d.rebnconvin.conv_s1.gate
    tied_report = result.report.to_dict()["tied"]
    assert tied_report["stage2d.rebnconvin.conv_s1"] == ["stage1d.rebnconvin.conv_s1"]
    assert len(tied_report) == 8  # every conv of the shared RSU4

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    state = snapshot(tied)
    gates_stage_step(tied, x)
    gate_changes, other_changes = changed_keys(state, tied)
    assert gate_changes and not other_changes, other_changes[:5]
    path = save(tied, tmp_path / "tied.safetensors", meta_tied)
    aliases = read_metadata(path).aliases
    pair = ("stage1d.rebnconvin.conv_s1.gate.gamma", "stage2d.rebnconvin.conv_s1.gate.gamma")
    assert aliases.get(pair[0]) == pair[1] or aliases.get(pair[1]) == pair[0]  # stored once
    loaded = load(path)
    assert loaded.stage1d is loaded.stage2d
    assert _equal(run_model(tied, x), run_model(loaded, x))


def test_functional_convs_are_reported_not_gated(cli, tmp_path):
    from fixtures.u2net import build_u2net_small

    model = build_u2net_small(functional_fuse=True).eval()
    x = torch.rand(1, 3, 32, 32)
    assert watch_convs(model, x).functional == ["<model> (F.conv2d)"]
    assert watch_convs(build_u2net_small().eval(), x).functional == []

    factory = f"{FIXTURES / 'u2net.py'}:build_u2net_functional_fuse"
    model, meta = open_model(factory)
    result = inject_model(model, meta, input_size=[3, 32, 32])
    assert result.functional_convs == ["<model> (F.conv2d)"]
    assert result.to_dict()["functional_convs"] == ["<model> (F.conv2d)"]
    assert result.max_abs_diff == 0.0
    assert len(gated_modules(model)) == 5 * 8 + 3  # every conv module; the fuse has none

    # The command line says so in one warning line.
    run = subprocess.run([cli, "inject", factory, "-o", str(tmp_path / "g.safetensors"),
                          "--input-size", "3,32,32"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "called as functions" in run.stderr and "<model> (F.conv2d)" in run.stderr


# --- beyond images: Conv1d sequences and Conv3d clips -----------------------------------

@pytest.mark.parametrize("factory,size,dims", [
    ("build_audio_cnn", [40, 64], 1),
    ("build_video_cnn", [3, 4, 32, 32], 3),
], ids=["conv1d-audio", "conv3d-video"])
def test_sequence_and_video_models_end_to_end(factory, size, dims, tmp_path):
    model, meta = open_model(f"{SEQ}:{factory}")
    model.eval()
    n_convs = len(select_targets(model).targets)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(3))
    before = run_model(model, x)

    result = inject_model(model, meta, input_size=size)
    assert result.report.gates_total == n_convs and result.max_abs_diff == 0.0
    assert all(g.alpha.dim() == 2 + dims for g in gates(model).values())
    assert _equal(before, run_model(model, x))

    state = snapshot(model)
    gates_stage_step(model, x)
    gate_changes, other_changes = changed_keys(state, model)
    assert gate_changes and not other_changes, other_changes[:5]

    ckpt, out = tmp_path / "trained.safetensors", tmp_path / "export.safetensors"
    save(model, ckpt, result.meta)
    exported = export(ckpt, out, input_size=size)
    assert exported.gates == n_convs
    assert _equal(run_model(model, x), run_model(load(out), x))
