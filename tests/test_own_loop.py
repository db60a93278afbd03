"""Your own model, your own training loop (issue 13).

A U^2-Net-style model of a user's own writing (tests/fixtures/ownnet: nested U-blocks,
side outputs through a sigmoid, a BatchNorm subclass whose bias is frozen at zero, a
factory file that imports the module beside it) through the public training-loop API
in plain PyTorch, and through the command line without PYTHONPATH.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gct_surgery
import gct_surgery.cli
from fixtures import FIXTURES
from gct_surgery import (ModelSource, build_model, freeze_base, inject, load, param_groups, save,
                         unfreeze)
from gct_surgery.errors import CheckpointError, SourceError, UserError

OWN = FIXTURES / "ownnet"
FACTORY = f"{OWN / 'salnet.py'}:build"
README = Path(__file__).resolve().parents[1] / "README.md"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run(cli, *args, cwd=None):
    return subprocess.run([cli, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=300)


def _trained_salnet():
    """The user's model as trained: random weights, non-trivial BN statistics."""
    torch.manual_seed(0)
    model = build_model(ModelSource(FACTORY))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, model) -> set[str]:
    after = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def _steps(model, optimizer, x, y, n: int = 3) -> None:
    """The user's loop: deep supervision, one BCE per sigmoid output."""
    model.train()
    for _ in range(n):
        loss = sum(F.binary_cross_entropy(o, y) for o in model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _outputs(model, x) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return list(model(x))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


# --- the own-loop path --------------------------------------------------------------

def test_own_loop_gates_then_full_then_save_and_load(tmp_path):
    model = _trained_salnet()
    user_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert user_frozen and all(n.endswith("bn.bias") for n in user_frozen)
    inject(model)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()

    # 1. gates stage: only the gates move; every base tensor and BN statistic stays put
    before = _snapshot(model)
    trainable = freeze_base(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
    groups = param_groups(model, lr=0.05, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"gate_beta", "gate_alpha_gamma"}
    assert next(g for g in groups if g["name"] == "gate_beta")["weight_decay"] == 0.0
    _steps(model, torch.optim.AdamW(groups), x, y)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in bns)  # held through model.train()
    changed = _changed(before, model)
    assert changed and all(".gate." in k for k in changed)
    assert any(k.endswith("gate.gamma") for k in changed)

    # 2. unfreeze: the user's flags again (the zero bias stays frozen), BN trains
    unfreeze(model)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == user_frozen
    model.train()
    assert all(m.training for m in bns)
    groups = param_groups(model, lr=0.05)
    assert next(g for g in groups if g["name"] == "base_decay")["lr"] == pytest.approx(0.005)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    before = _snapshot(model)
    _steps(model, torch.optim.AdamW(groups), x, y)
    changed = _changed(before, model)
    assert not {k for k in changed if k.endswith("bn.bias")}  # the user's frozen bias
    assert {"stage1.inp.conv.weight", "stage1.inp.bn.running_mean"} <= changed
    assert all(torch.all(before[n] == 0) for n in user_frozen)

    # 3. save with the source (a relative path: it is recorded absolute) and load
    path = tmp_path / "own.safetensors"
    relative = os.path.relpath(OWN / "salnet.py") + ":build"
    save(model, path, source=relative, data={"input_size": [3, 32, 32], "mean": [0.5], "std": [0.5]})
    meta = gct_surgery.read_metadata(path)
    assert meta.source["spec"] == FACTORY
    assert meta.data["mean"] == [0.5, 0.5, 0.5] and meta.data["input_size"] == [3, 32, 32]
    loaded = load(path)
    assert _same(_outputs(model, x), _outputs(loaded, x))

    # 4. a loaded model carries its record: train it and save it again with nothing more
    freeze_base(loaded)
    _steps(loaded, torch.optim.AdamW(param_groups(loaded, lr=0.05)), x, y, n=1)
    unfreeze(loaded)
    again = save(loaded, tmp_path / "again.safetensors")
    assert gct_surgery.read_metadata(again).history[-1]["action"] == "save"
    assert _same(_outputs(loaded, x), _outputs(load(again), x))


def test_freeze_base_options_record_and_copies():
    model = timm_model()
    model.conv1[0].weight.requires_grad_(False)  # the user froze the stem
    freeze_base(model, train_head=True, train_bn=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "bn1.weight"} <= names and "conv1.0.weight" not in names
    assert "layer1.0.conv1.weight" not in names and "layer1.0.conv1.gate.gamma" in names
    # while the base is frozen, what trains uses lr (a new head must move)
    assert {g["lr"] for g in param_groups(model, lr=0.3)} == {0.3}
    freeze_base(model)  # a second call keeps the first record of the user's flags
    unfreeze(model)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["conv1.0.weight"]

    # a held model deep-copies (EMA) and pickles; the copy is held on its own
    freeze_base(model)
    twin = copy.deepcopy(model)
    twin.train()
    assert not twin.bn1.training and twin.layer1[0].bn1.train.args[0] is twin.layer1[0].bn1
    restored = pickle.loads(pickle.dumps(model))
    restored.train()
    assert not restored.bn1.training
    unfreeze(twin)
    twin.train()
    assert twin.bn1.training and not model.bn1.training


def timm_model():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    inject(model)
    return model


def test_own_loop_user_errors(tmp_path):
    plain = build_model(ModelSource(FACTORY))
    with pytest.raises(UserError, match="no gates"):
        freeze_base(plain)
    model = timm_model()
    with pytest.raises(CheckpointError, match="pass source="):
        save(model, tmp_path / "x.safetensors")
    with pytest.raises(SourceError, match="builds another model"):
        save(model, tmp_path / "x.safetensors", source="timm:test_resnet")  # 1000 classes there
    save(model, tmp_path / "x.safetensors", source=ModelSource("timm:test_resnet", {"num_classes": 3}))
    with pytest.raises(UserError, match="2 values for 3 input channels"):
        save(model, tmp_path / "x.safetensors", data={"mean": [0.5, 0.5]})
    with pytest.raises(UserError, match="interpolation 'cubic'"):
        save(model, tmp_path / "x.safetensors", data={"interpolation": "cubic"})
    assert not any(p.requires_grad is False for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="nothing in the model trains"):
        param_groups(model, lr=0.1)


# --- the command line: inject, finetune --stage full, eval ---------------------------

def test_cli_user_model_imports_its_neighbours_and_keeps_its_frozen_bias(cli, tmp_path, capsys):
    sys.path.insert(0, str(OWN))
    from salnet_data import write_saliency_folder

    data = write_saliency_folder(tmp_path / "data")
    gated = tmp_path / "gated.safetensors"
    # no PYTHONPATH; relative paths from the project folder
    run = _run(cli, "inject", "salnet.py:build", "--input-size", "3,32,32", "--mean", "0.5",
               "--std", "0.5", "--interpolation", "bilinear", "--crop-pct", "1", "-o", gated, cwd=OWN)
    assert run.returncode == 0, run.stderr
    assert "assume" not in run.stderr
    out = tmp_path / "run"
    run = _run(cli, "finetune", gated, "--data", data, "--task", "salnet_task.py:SaliencyTask",
               "--stage", "full", "--epochs", "1", "--lr", "0.05", "--batch-size", "2",
               "--workers", "0", "--device", "cpu", "--no-aug", "-o", out, cwd=OWN)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "assumed" not in run.stderr
    before, after = load(gated).state_dict(), load(out / "last.safetensors").state_dict()
    biases = [k for k in before if k.endswith("bn.bias")]
    assert biases and all(torch.equal(before[k], after[k]) for k in biases)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("conv.weight") for k in moved) and any(".gate." in k for k in moved)
    data_record = gct_surgery.read_metadata(out / "last.safetensors").data
    assert data_record["mean"] == [0.5] * 3 and data_record["interpolation"] == "bilinear"
    assert "assumed" not in data_record
    # the task's per-image MAE at the final epoch, in the val set's order: --baseline pairs on it
    per_image = load_file(out / "per_image.safetensors")["values"]
    final = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    assert per_image.shape == (4,) and per_image.mean().item() == pytest.approx(float(final["mae"]))

    # eval from another folder: the recorded task (an absolute path) scores it
    run = _run(cli, "eval", out / "last.safetensors", "--data", data, "--workers", "0", "--json",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["task"] == f"{OWN / 'salnet_task.py'}:SaliencyTask"
    assert 0.0 <= doc["mae"] <= 1.0 and doc["samples"] == 4
    # scored as a classifier, a model of tuple outputs is one line and exit 2
    code = gct_surgery.cli.run(["eval", str(gated), "--data", str(data), "--workers", "0",
                                "--task", "classification"])
    err = capsys.readouterr().err
    assert code == 2 and "not (N, classes) logits" in err and err.strip().count("\n") == 0


def test_a_missing_neighbour_or_package_is_named(cli, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(OWN / "salnet.py", alone / "salnet.py")  # without salnet_blocks.py beside it
    run = _run(cli, "inject", alone / "salnet.py:build", "--dry-run", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "No module named 'salnet_blocks'" in run.stderr and str(alone) in run.stderr

    # package.module:factory resolves from the current folder and records it
    project = tmp_path / "project"
    (project / "ownproj").mkdir(parents=True)
    (project / "ownproj" / "__init__.py").write_text("")
    (project / "ownproj" / "layers.py").write_text(
        "import torch.nn as nn\n"
        "def block(c):\n    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())\n")
    (project / "ownproj" / "net.py").write_text(
        "import torch.nn as nn\nfrom ownproj.layers import block\n"
        "def build(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), block(width))\n")
    ckpt = tmp_path / "pkg.safetensors"
    run = _run(cli, "inject", "ownproj.net:build", "--input-size", "3,16,16", "-o", ckpt, cwd=project)
    assert run.returncode == 0, run.stderr
    assert gct_surgery.read_metadata(ckpt).source["root"] == str(project)
    assert len(gct_surgery.gates(load(ckpt))) == 2  # from this process's folder, not the project's
    project.rename(tmp_path / "moved")
    run = _run(cli, "inspect", ckpt, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "cannot find ownproj.net" in run.stderr and str(project) in run.stderr


def test_a_recorded_root_must_be_an_own_folder():
    import sysconfig

    from gct_surgery.io.sources import check_recorded_source

    check_recorded_source({"spec": "ownproj.net:build", "root": "/srv/project"})
    check_recorded_source({"spec": "ownproj.net:build", "root": sysconfig.get_paths()["purelib"]})
    cases = [({"spec": "ownproj.net:build", "root": "relative/folder"}, "absolute folder"),
             ({"spec": "timm:resnet18", "root": "/srv/project"}, "only with a package"),
             ({"spec": "/srv/net.py:build", "root": "/srv"}, "only with a package")]
    for source, needle in cases:
        with pytest.raises(CheckpointError, match=needle):
            check_recorded_source(source)


# --- targets whose input is 1x1 ------------------------------------------------------

def test_convs_with_1x1_inputs_are_skipped_with_the_reason_and_kept_on_request():
    import timm

    from gct_surgery.core.gate import GateConfig
    from gct_surgery.core.targets import TargetSpec
    from gct_surgery.operations import inject_model, open_model, plan

    model = timm.create_model("mobilenetv3_small_050")
    rows = plan(model, TargetSpec(), GateConfig(), input_size=[3, 224, 224])
    skipped = [r for r in rows if r["action"].startswith("skip: input is 1x1")]
    assert len(rows) == 53 and len(skipped) == 19
    assert {"conv_head", "blocks.0.0.se.conv_reduce"} <= {r["module"] for r in skipped}
    kept = plan(model, TargetSpec(keep_1x1=True), GateConfig(), input_size=[3, 224, 224])
    assert sum(r["action"] == "gate" for r in kept) == 53

    model, meta = open_model("timm:test_resnet", num_classes=3)
    result = inject_model(model, meta, input_size=[3, 32, 32])
    assert set(result.report.to_dict()["skipped"]) == {"layer4.0.conv2", "layer4.0.downsample.1"}
    assert result.max_abs_diff == 0.0 and result.meta.targets["keep_1x1"] is False
    model, meta = open_model("timm:test_resnet", num_classes=3)
    assert inject_model(model, meta, input_size=[3, 32, 32],
                        targets=TargetSpec(keep_1x1=True)).report.gates_added == 15


# --- preprocessing -------------------------------------------------------------------

def test_preprocessing_is_recorded_or_the_assumption_named(tmp_path, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from gct_surgery.analysis import load_images
    from gct_surgery.operations import inject_model, open_model
    from gct_surgery.train.data import resolve_data_config

    model, meta = open_model(FACTORY)
    assert "mean" not in meta.data  # a user's model: nothing made up
    with caplog.at_level(logging.WARNING, logger="gct_surgery"):
        cfg = resolve_data_config(meta.data)
    assert cfg["assumed"] == ["mean", "std", "interpolation", "crop_pct"]
    assert "assumed mean [0.485, 0.456, 0.406]" in caplog.text and "--mean" in caplog.text

    result = inject_model(model, meta, input_size=[3, 32, 32],
                          data={"mean": [0.5], "std": [0.25], "interpolation": "bilinear", "crop_pct": 1.0})
    recorded = result.meta.data
    assert recorded["mean"] == [0.5] * 3 and recorded["std"] == [0.25] * 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gct_surgery"):
        cfg = resolve_data_config(recorded)
    assert "assumed" not in cfg and cfg["interpolation"] == "bilinear" and not caplog.text
    # inspect reads images with the recorded normalisation
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((8, 8, 3), 153, dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    images = load_images(tmp_path / "img", {**recorded, "input_size": [3, 8, 8]})
    assert torch.allclose(images, torch.full_like(images, (153 / 255 - 0.5) / 0.25), atol=1e-5)

    # torchvision's own preprocessing, and timm's, need no assumption
    _, tv = open_model("torchvision:resnet18")
    assert tv.data["interpolation"] == "bilinear" and tv.data["mean"] == [0.485, 0.456, 0.406]
    _, tm = open_model("timm:test_resnet")
    assert "assumed" not in resolve_data_config(tm.data)


def test_cli_rejects_bad_preprocessing_in_one_line(cli, tmp_path):
    run = _run(cli, "inject", f"{FACTORY}", "--input-size", "3,32,32", "--mean", "0.5,0.5",
               "-o", tmp_path / "x.safetensors")
    assert run.returncode == 2 and "2 values for 3 input channels" in run.stderr
    assert run.stderr.strip().count("\n") == 0 and not (tmp_path / "x.safetensors").exists()


# --- keep_frozen and the comparison's arms -------------------------------------------

def test_keep_frozen_patterns_and_user_flags_hold_in_every_stage_and_arm(tmp_path):
    from gct_surgery.core.surgery import remove
    from gct_surgery.train.recipe import load_recipe
    from gct_surgery.train.stages import freeze_for_stage

    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text('keep_frozen = ["^side"]\n[[stage]]\nkind = "gates"\n[[stage]]\nkind = "full"\n')
    recipe = load_recipe(recipe_path)
    assert all(s.keep_frozen == ("^side",) for s in recipe.stages)
    assert recipe.to_dict()["stages"][1]["keep_frozen"] == ["^side"]

    def trainable_base(model):
        return {n for n, p in model.named_parameters() if p.requires_grad and ".gate." not in n}

    gct = build_model(ModelSource(FACTORY))
    inject(gct)
    control = build_model(ModelSource(FACTORY))
    inject(control)
    remove(control)
    for stage in recipe.stages:
        freeze_for_stage(gct, stage)
        freeze_for_stage(control, stage, allow_empty=True)
        assert trainable_base(gct) == trainable_base(control)
    full = trainable_base(gct)
    assert full and not any(n.startswith("side") or n.endswith("bn.bias") for n in full)

    bad = load_recipe(_write(tmp_path / "bad.toml", 'keep_frozen = ["^nothing"]\n[[stage]]\nkind = "full"\n'))
    with pytest.raises(UserError, match="keep_frozen pattern '\\^nothing' matches no parameter"):
        freeze_for_stage(gct, bad.stages[0])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the README's own-loop section runs as written -----------------------------------

def test_readme_own_training_loop_block_runs_as_written(tmp_path):
    text = README.read_text()
    section = text[text.index("## Your own training loop"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert 10 <= len(block.strip().splitlines()) <= 30
    shutil.copytree(FIXTURES / "ownnet", tmp_path / "tests" / "fixtures" / "ownnet")
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "salnet-gct.safetensors").is_file()
