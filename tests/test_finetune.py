"""Staged fine-tuning end to end: freezing, outputs, resume after a kill or Ctrl-C,
and a non-classification task through the ``--task`` hook.

Tiny real models (timm ``test_resnet``, 3 classes) on real PNG files at 32 px.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gct_surgery
from gct_surgery.cli import run as cli_run
from gct_surgery.io.checkpoint import read_metadata
from gct_surgery.train.config import TrainConfig
from gct_surgery.train.loop import finetune, resume
from gct_surgery.train.state import read_state
from gct_surgery.train.recipe import default_recipe

from fixtures.runs import CLASSES, make_checkpoint, write_folder




def base_args(ckpt, data, out, *extra):
    return ["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--img-size", "32",
            "--batch-size", "8", "--workers", "0", "--epochs", "1", *extra]


# --- what each stage freezes ---------------------------------------------------------

@pytest.fixture(scope="module")
def gates_run(ckpt, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gates"
    assert cli_run(base_args(ckpt, data, out, "--stage", "gates", "--lr", "0.05")) == 0
    return out


def test_gates_stage_changes_only_gates(ckpt, gates_run):
    before, after = load_file(ckpt), load_file(gates_run / "last.safetensors")
    assert before.keys() == after.keys()
    gate_keys = [k for k in before if ".gate." in k]
    others = [k for k in before if ".gate." not in k]
    assert any("running_mean" in k for k in others) and any("num_batches_tracked" in k for k in others)
    for k in others:  # weights, BN running stats and counters: bit for bit
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in gate_keys if not torch.equal(before[k], after[k])]
    assert any(k.endswith(".beta") for k in changed) and any(k.endswith(".gamma") for k in changed)


def test_run_folder_outputs(gates_run):
    for name in ("last.safetensors", "best.safetensors", "metrics.png", "recipe.json", "run.json", "state.pt"):
        assert (gates_run / name).is_file(), name
    assert (gates_run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(gates_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # epoch 0 (the model as it came), then the one trained epoch
    assert list(rows[0]) == ["epoch", "stage", "train_loss", "val_loss", "top1", "top5", "lr",
                             "base_lr", "seconds", "images_per_s"]
    assert [r["stage"] for r in rows] == ["start", "gates"] and rows[0]["epoch"] == "0"
    assert 0 <= float(rows[1]["top1"]) <= 100 and float(rows[1]["lr"]) > 0
    assert rows[1]["base_lr"] == "nan"  # the base is frozen in a gates stage
    recipe = json.loads((gates_run / "recipe.json").read_text())
    assert [s["kind"] for s in recipe["stages"]] == ["gates"]
    meta = read_metadata(gates_run / "last.safetensors")
    actions = [e["action"] for e in meta.history]
    assert actions[-2:] == ["recipe", "finetune"]
    assert meta.history[-2]["recipe"]["stages"][0]["lr"] == 0.05
    assert meta.data["input_size"] == [3, 32, 32]
    # The train state is plain data: it loads with weights_only=True.
    state = torch.load(gates_run / "state.pt", weights_only=True)
    assert state["stage_index"] == 0 and state["epoch"] == 1
    # best is a self-describing checkpoint every command reads.
    model = gct_surgery.load(gates_run / "best.safetensors")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, CLASSES)


def test_full_stage_changes_the_base(ckpt, data, tmp_path):
    out = tmp_path / "full"
    assert cli_run(base_args(ckpt, data, out, "--stage", "full", "--lr", "0.05")) == 0
    before, after = load_file(ckpt), load_file(out / "last.safetensors")
    base = [k for k in before if ".gate." not in k and before[k].is_floating_point()]
    changed = [k for k in base if not torch.equal(before[k], after[k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    # the default full stage keeps BN statistics frozen (docs/gates-study.md)
    assert not any(k.endswith("running_mean") for k in changed)
    assert any(k.endswith(".gate.beta") and not torch.equal(before[k], after[k]) for k in before)


def test_new_head_for_another_class_count(data, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ten.safetensors", num_classes=10)
    out = tmp_path / "run"
    assert cli_run(base_args(ckpt, data, out, "--stage", "gates", "--num-classes", str(CLASSES))) == 0
    meta = read_metadata(out / "last.safetensors")
    assert meta.source["kwargs"]["num_classes"] == CLASSES
    assert meta.data["class_names"] == ["0_t-shirt_top", "1_trouser", "2_pullover"]
    assert json.loads((out / "recipe.json").read_text())["stages"][0]["train_head"] is True
    model = gct_surgery.load(out / "last.safetensors")
    assert model.get_classifier().out_features == CLASSES


def test_class_count_mismatch_is_one_line(data, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ten.safetensors", num_classes=10)
    assert cli_run(base_args(ckpt, data, tmp_path / "r", "--stage", "gates")) == 2
    err = capsys.readouterr().err
    assert "--num-classes 3" in err and "Traceback" not in err


@pytest.mark.parametrize("layout", ["missing", "no_val", "empty_class_dirs"])
def test_bad_data_folder_is_a_user_error(ckpt, tmp_path, capsys, layout):
    root = tmp_path / "d"
    if layout != "missing":
        (root / "train" / "a").mkdir(parents=True)
    if layout == "empty_class_dirs":
        (root / "val" / "a").mkdir(parents=True)
    assert cli_run(base_args(ckpt, root, tmp_path / "r", "--stage", "gates")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_a_corrupt_image_does_not_stop_the_run(ckpt, tmp_path):
    root = write_folder(tmp_path / "d", train=8, val=2)
    bad = next((root / "train").iterdir()) / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    assert cli_run(base_args(ckpt, root, tmp_path / "r", "--stage", "gates")) == 0


def test_an_existing_run_folder_is_not_overwritten(ckpt, data, gates_run, capsys):
    assert cli_run(base_args(ckpt, data, gates_run, "--stage", "gates")) == 2
    assert "--resume" in capsys.readouterr().err


# --- resume -------------------------------------------------------------------------

def _config(ckpt_dir: Path, data: Path, out: Path, save_every: int = 0) -> TrainConfig:
    # Augmentation stays on: the resumed run must restore the RNGs to match.
    return TrainConfig(data=str(data), out=str(out), batch_size=8, workers=0, seed=3,
                       img_size=32, save_every=save_every)


def _recipe():
    return default_recipe().override(epochs=2, lr=0.02)  # gates 2 epochs, then full 2 epochs


@pytest.fixture(scope="module")
def reference(ckpt, data, tmp_path_factory) -> dict:
    """The uninterrupted run both resume tests must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    finetune(ckpt, _recipe(), _config(ckpt, data, out))
    return load_file(out / "last.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_state_and_resume_matches(ckpt, data, tmp_path, reference):
    out = tmp_path / "run"

    def press_ctrl_c(event, info):  # mid-epoch, in the second (full) stage
        if event == "step" and info["stage"] == "full" and info["epoch"] == 0 and info["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune(ckpt, _recipe(), _config(ckpt, data, out), on_event=press_ctrl_c)
    state = read_state(out)
    assert (state["stage_index"], state["epoch"], state["step_in_epoch"]) == (1, 0, 1)
    resume(out)
    _assert_same_weights(load_file(out / "last.safetensors"), reference)
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2", "3", "4"]  # row 0: before training


def test_killed_mid_epoch_then_resumed_matches(ckpt, data, tmp_path, reference, cli):
    out = tmp_path / "run"
    args = base_args(ckpt, data, out)[:-2]  # drop --epochs 1: the recipe below sets them
    args += ["--epochs", "2", "--lr", "0.02", "--seed", "3", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process
    proc = subprocess.Popen([cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    killed_at = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state = torch.load(out / "state.pt", weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.02)
            continue
        if state["step_in_epoch"] >= 1:  # a state saved inside an epoch
            proc.send_signal(signal.SIGKILL)  # no chance to save anything
            killed_at = (state["stage_index"], state["epoch"], state["step_in_epoch"])
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read()[-500:]}"
    assert proc.returncode == -signal.SIGKILL
    state = read_state(out)
    assert state["stage_index"] < 2  # the run was cut short, and resumes where it stood
    assert cli_run(["finetune", "--resume", str(out)]) == 0
    _assert_same_weights(load_file(out / "last.safetensors"), reference)


def test_resume_of_a_folder_without_state_is_a_user_error(tmp_path, capsys):
    assert cli_run(["finetune", "--resume", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_hostile_state_file_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "run.json").write_text("{}")
    torch.save({"version": 1, "x": Evil()}, tmp_path / "state.pt")
    assert cli_run(["finetune", "--resume", str(tmp_path)]) == 2
    assert "not a readable train state" in capsys.readouterr().err


# --- a model that is not a classifier -----------------------------------------------

SALIENCY = '''
import torch
from torch import nn
from PIL import Image
from pathlib import Path


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 1, 1))


class Pairs(torch.utils.data.Dataset):
    def __init__(self, folder, size):
        self.images = sorted(Path(folder).glob("*_img.png"))
        self.size = size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        def read(path, mode):
            im = Image.open(path).convert(mode).resize((self.size, self.size))
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float() / 255
            return t.view(self.size, self.size, -1).permute(2, 0, 1)
        image = self.images[i]
        return read(image, "RGB"), read(str(image).replace("_img", "_mask"), "L")


class Saliency:
    metric_names = ("mae",)
    primary_metric = "mae"
    higher_is_better = False

    def datasets(self, data_dir, data_config, *, augment):
        size = data_config["input_size"][-1]
        return Pairs(Path(data_dir) / "train", size), Pairs(Path(data_dir) / "val", size)

    def loss(self, output, target):
        return nn.functional.binary_cross_entropy_with_logits(output.float(), target)

    def metric_sums(self, output, target):
        err = (output.float().sigmoid() - target).abs().flatten(1).mean(1)
        return {"mae": err.sum().item()}
'''


def test_task_hook_trains_a_saliency_model(tmp_path):
    import numpy as np
    from PIL import Image

    module = tmp_path / "saliency.py"
    module.write_text(SALIENCY)
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        (tmp_path / "sal" / split).mkdir(parents=True)
        for i in range(n):  # a bright square on noise; the mask marks the square
            img = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            mask = np.zeros((24, 24), np.uint8)
            y, x = rng.integers(0, 12, 2)
            img[y:y + 10, x:x + 10] = 230
            mask[y:y + 10, x:x + 10] = 255
            Image.fromarray(img).save(tmp_path / "sal" / split / f"{i}_img.png")
            Image.fromarray(mask).save(tmp_path / "sal" / split / f"{i}_mask.png")
    ckpt = make_checkpoint(tmp_path / "sal.safetensors", spec=f"{module}:build", num_classes=None)
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(tmp_path / "sal"), "--out", str(out),
            "--task", f"{module}:Saliency", "--img-size", "24", "--batch-size", "4",
            "--workers", "0", "--epochs", "2", "--lr", "0.05"]
    assert cli_run(args) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["start", "gates", "gates", "full", "full"]
    assert "mae" in rows[0] and "top1" not in rows[0]
    before, after = load_file(ckpt), load_file(out / "last.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if ".gate." in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".gate." not in k)
    assert gct_surgery.load(out / "best.safetensors")(torch.rand(1, 3, 24, 24)).shape == (1, 1, 24, 24)


def test_bad_task_spec_is_a_user_error(ckpt, data, tmp_path, capsys):
    assert cli_run(base_args(ckpt, data, tmp_path / "r", "--task", "no_such_module_xyz:Task")) == 2
    assert "--task" in capsys.readouterr().err
