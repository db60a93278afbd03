"""``torchrun --nproc-per-node 2`` on CPU (gloo) gives the single-process result.

Why they are comparable: the global batch is the same (8 = 2 ranks x 4), the
DistributedSampler draws one permutation from ``seed + epoch`` and deals it out, so
each step sees the same 8 images; DDP averages the two per-rank mean gradients, which
equals the mean over the 8; BN statistics are frozen in the gates stage, so no layer
sees a per-rank batch; and there is no augmentation (``--no-aug``), whose random draws
would differ per rank. What remains is float32 summation order in the gradient
all-reduce: ~1e-7 relative per step. SGD (not Adam, whose update is roughly the
gradient's sign and turns tiny differences into lr-sized steps) keeps it that small:
after 6 steps the weights agree to within atol 1e-5, rtol 1e-4.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gct_surgery.cli import run as cli_run

from fixtures.runs import make_checkpoint, write_folder

RECIPE = """
[[stage]]
name = "gates"
kind = "gates"
epochs = 2
opt = "sgd"
lr = 0.5
warmup = 0.0
"""


def test_two_process_torchrun_matches_one_process(tmp_path):
    data = write_folder(tmp_path / "imgs", train=8, val=3)
    ckpt = make_checkpoint(tmp_path / "c.safetensors")
    (tmp_path / "r.toml").write_text(RECIPE)
    common = [str(ckpt), "--data", str(data), "--recipe", str(tmp_path / "r.toml"), "--img-size", "32",
              "--batch-size", "8", "--workers", "0", "--no-aug", "--seed", "1", "--device", "cpu"]

    # both in fresh processes: a test process's earlier tests must not decide the numbers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = tmp_path / "single"
    proc = subprocess.run([str(Path(sys.executable).parent / "gct-surgery"), "finetune", *common,
                           "--out", str(single)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    multi = tmp_path / "multi"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           str(Path(sys.executable).parent / "gct-surgery"), "finetune", *common,
                           "--out", str(multi)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    a, b = load_file(single / "last.safetensors"), load_file(multi / "last.safetensors")
    assert a.keys() == b.keys()
    start = load_file(ckpt)
    moved = [k for k in a if ".gate." in k and not torch.equal(a[k], start[k])]
    assert moved  # the comparison is about weights that trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    # Rank 0 alone wrote the metrics: row 0 and one row per epoch, and the same validation numbers
    # (metrics summed over both ranks' shards of the val set).
    rows = [list(csv.DictReader(open(d / "metrics.csv"))) for d in (single, multi)]
    assert len(rows[1]) == 3  # row 0 (before training), then one per epoch
    for r1, r2 in zip(*rows):
        assert float(r1["val_loss"]) == pytest.approx(float(r2["val_loss"]), rel=1e-4)
        assert float(r1["top1"]) == pytest.approx(float(r2["top1"]))
    assert sum(line.startswith("epoch 2 ") for line in proc.stdout.splitlines()) == 1  # rank 0
    assert not list(multi.glob(".*.tmp"))


ONE_EPOCH = RECIPE.replace("epochs = 2", "epochs = 1")


def test_a_two_process_comparison_runs_like_a_single_run(tmp_path):
    """Under torchrun a --baseline comparison trains each arm with every rank in turn;
    rank 0 alone creates the folders, writes and decides: one comparison, two seeds."""
    data = write_folder(tmp_path / "imgs", train=8, val=3)
    ckpt = make_checkpoint(tmp_path / "c.safetensors")
    (tmp_path / "r.toml").write_text(ONE_EPOCH)
    out = tmp_path / "cmp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(bin_dir / "gct-surgery"), "finetune", str(ckpt), "--data", str(data),
                           "--recipe", str(tmp_path / "r.toml"), "--img-size", "32",
                           "--batch-size", "8", "--workers", "0", "--no-aug", "--device", "cpu",
                           "--out", str(out), "--baseline", "--seeds", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["seed"] for r in doc["runs"]] == [0, 1] and doc["verdict"]["seeds"] == 2
    assert proc.stdout.count("conclusion:") == 1  # rank 0 alone prints the verdict
    # Every validation image once, gathered from both ranks in the set's order: what one
    # process scores with the control's final weights.
    from gct_surgery.io.checkpoint import load_checkpoint
    from gct_surgery.train.evaluate import evaluate
    from gct_surgery.train.data import resolve_data_config
    from gct_surgery.train.task import load_task

    arm = out / "seed-1" / "control"
    loaded = load_checkpoint(arm / "last.safetensors")
    task = load_task(None)
    _, val = task.datasets(data, resolve_data_config(loaded.meta.data, loaded.model, img_size=32),
                           augment=False)
    alone = evaluate(loaded.model, val, task, torch.device("cpu"), batch_size=4, per_image=True)
    gathered = load_file(arm / "per_image.safetensors")["values"]
    assert gathered.shape == (9,) and torch.equal(gathered, alone["per_image"])
