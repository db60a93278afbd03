"""Threads and loader workers chosen from the machine (train/distributed.py), said at the
start of a run and recorded; persistent loader workers that keep the data exact."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from gct_surgery.errors import UserError
from gct_surgery.train import distributed as machine
from gct_surgery.train.config import TrainConfig


# --- the rule -------------------------------------------------------------------------

def test_a_two_core_cpu_run_computes_on_both_cores_without_workers():
    chosen = machine.choose("cpu", cores=2, processes=1, current_threads=2)
    assert (chosen.threads, chosen.workers) == (2, 0)
    assert chosen.line() == "CPU: 2 threads, 0 loader workers (auto: 2 cores)"


def test_a_cuda_run_decodes_in_workers_and_keeps_a_core_for_the_main_process():
    chosen = machine.choose("cuda", cores=16, processes=1, current_threads=16)
    assert chosen.workers == machine.MAX_CUDA_WORKERS and chosen.threads == 8
    small = machine.choose("cuda", cores=2, processes=1, current_threads=2)
    assert (small.threads, small.workers) == (1, 1)


def test_torchrun_processes_share_the_cores():
    chosen = machine.choose("cpu", cores=2, processes=2, current_threads=2)
    assert (chosen.threads, chosen.workers) == (1, 0)
    assert "shared by 2 processes" in chosen.line()
    gpus = machine.choose("cuda", cores=16, processes=4, current_threads=16)
    assert (gpus.threads, gpus.workers) == (1, 3)


def test_auto_never_raises_a_thread_count_the_caller_set():
    assert machine.choose("cpu", cores=8, processes=1, current_threads=1).threads == 1


def test_an_explicit_count_wins_and_a_bad_one_is_a_user_error():
    chosen = machine.choose("cpu", threads=1, workers=2, cores=2, processes=1, current_threads=2)
    assert (chosen.threads, chosen.workers, chosen.threads_given, chosen.workers_given) == (1, 2, True, True)
    # workers given, threads auto: each worker is left a core
    assert machine.choose("cpu", workers=1, cores=2, processes=1, current_threads=2).threads == 1
    with pytest.raises(UserError, match="--threads 0"):
        TrainConfig(data="d", out="o", threads=0)
    with pytest.raises(UserError, match="--workers -1"):
        machine.choose("cpu", workers=-1)


def test_this_process_cores_follow_its_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert machine.usable_cores() == len(os.sched_getaffinity(0))
    assert machine.usable_cores() >= 1


# --- persistent workers keep the data exact -------------------------------------------

def _loader(data, workers):
    from gct_surgery.train.data import create_transform, make_loader
    from gct_surgery.train.layouts import open_split

    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
           "interpolation": "bilinear", "crop_pct": 0.9}
    dataset = open_split(data, "train", transform=create_transform(cfg, training=True))
    return make_loader(dataset, 4, training=True, seed=5, workers=workers)


def _epoch(loader, epoch, skip=0):
    from gct_surgery.train.data import start_epoch

    start_epoch(loader, epoch, skip_batches=skip)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_persistent_workers_see_what_fresh_workers_would_over_two_epochs_and_a_resume(data):
    kept = _loader(data, workers=2)
    assert kept.persistent_workers
    persistent = [_epoch(kept, e) for e in (0, 1)]
    fresh = [_epoch(_loader(data, workers=2), e) for e in (0, 1)]  # today's: workers restart
    assert _same(persistent[0], fresh[0]) and _same(persistent[1], fresh[1])
    assert not _same(persistent[0], persistent[1])  # the epochs differ (order, augmentation)
    # A run resumed at step 2 of epoch 1 sees the same samples in the same order. (With
    # workers, the augmentation of the rest of that epoch differs, as it always has: a
    # worker's RNG stream is not saved; with 0 workers, the default on CPU, it is exact.)
    resumed = _epoch(_loader(data, workers=2), 1, skip=2)
    assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in persistent[1][2:]]
    assert _same(_epoch(_loader(data, workers=2), 2), _epoch(kept, 2))  # the next epoch: exact


# --- said at the start and recorded ---------------------------------------------------

def test_the_chosen_setting_is_printed_and_recorded(ckpt, data, tmp_path, cli):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["--data", str(data), "--img-size", "32", "--batch-size", "8", "--epochs", "1",
              "--stage", "gates"]
    out = tmp_path / "given"
    proc = subprocess.run([cli, "finetune", str(ckpt), *common, "--out", str(out), "--threads", "1",
                           "--workers", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CPU: 1 thread, 0 loader workers (--threads given; --workers given;" in proc.stdout + proc.stderr
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["machine"]["threads"] == 1 and recorded["machine"]["workers"] == 0
    assert recorded["config"]["threads"] == 1  # what was asked; auto stays None for a resume

    out = tmp_path / "auto"
    proc = subprocess.run([cli, "finetune", str(ckpt), *common, "--out", str(out), "--json"],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["machine"]["workers"] == 0 and result["machine"]["threads"] == 1
    assert not result["machine"]["threads_given"] and not result["machine"]["workers_given"]
    assert json.loads((out / "run.json").read_text())["config"]["workers"] is None

    proc = subprocess.run([cli, "eval", str(out / "last.safetensors"), "--data", str(data),
                           "--img-size", "32", "--threads", "1", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["machine"]["threads"] == 1
