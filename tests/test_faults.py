"""Faults during training: a real ``gct-surgery finetune`` process killed with SIGKILL
during an epoch, during a checkpoint write and between stages, or stopped by SIGTERM,
resumes to the very weights of an uninterrupted run. A non-finite loss stops the stage
naming the step and leaves the last good files untouched; ``--skip-nonfinite N``
tolerates a few such batches. A full disk is one clear error and keeps the previous
files.

Kill points are made deterministic by the ``GCT_SURGERY_FAULT`` testing hook: the
process sends itself the signal at the chosen point (docs/reliability.md).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gct_surgery
from gct_surgery.io.checkpoint import read_metadata
from gct_surgery.cli import run as cli_run
from gct_surgery.train.config import TrainConfig
from gct_surgery.io.atomic import WriteError
from gct_surgery.train.faults import NonFiniteLossError
from gct_surgery.train.loop import finetune
from gct_surgery.train.state import read_state
from gct_surgery.train.recipe import default_recipe

from fixtures.disks import fill

# 24 train images, batch 8: 3 steps an epoch; gates 1 epoch (steps 1-3), then full 1
# epoch (steps 4-6); a mid-epoch state at the 2nd step of each epoch.
ARGS = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
        "--lr", "0.02", "--seed", "3", "--save-every", "2"]
RECIPE = default_recipe().override(epochs=1, lr=0.02)




def config(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), batch_size=8, workers=0, seed=3,
                       img_size=32, save_every=2, **kw)


@pytest.fixture(scope="module")
def reference(ckpt, data, tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must reproduce, bit for bit."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    finetune(ckpt, RECIPE, config(data, out))
    return load_file(out / "last.safetensors")


def run_cli(cli: str, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # same numerics as here
    env.pop("GCT_SURGERY_FAULT", None)
    if fault:
        env["GCT_SURGERY_FAULT"] = fault
    return subprocess.run([cli, *args], capture_output=True, text=True, env=env, timeout=300)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def temps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


# --- kill -9 (and SIGTERM) at each point, then resume ------------------------------

# fault -> (exit status, where the saved state stands: stage index, epoch, step)
KILL_POINTS = {
    "kill:after_step:5": (-signal.SIGKILL, (1, 0, 2)),                    # mid-epoch, in full
    "kill:during_save:last.safetensors:2": (-signal.SIGKILL, (1, 0, 2)),  # writing epoch 2's model
    "kill:during_save:state.pt:2": (-signal.SIGKILL, (0, 0, 2)),          # writing epoch 1's state
    "kill:between_stages:1": (-signal.SIGKILL, (0, 1, 0)),                # gates done, full not begun
    "term:after_step:4": (128 + signal.SIGTERM, (1, 0, 1)),               # preemption, mid-epoch
}


@pytest.mark.parametrize("fault", list(KILL_POINTS))
def test_interrupted_run_resumes_to_the_same_weights(fault, ckpt, data, tmp_path, cli, reference):
    out = tmp_path / "run"
    done = run_cli(cli, ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS], fault)
    status, where = KILL_POINTS[fault]
    assert done.returncode == status, done.stderr[-800:]
    assert "Traceback" not in done.stderr
    state = read_state(out)  # the previous state is readable
    assert (state["stage_index"], state["epoch"], state["step_in_epoch"]) == where
    if (out / "last.safetensors").exists():  # and so is the previous checkpoint
        gct_surgery.load(out / "last.safetensors")
    if "during_save:last" in fault:  # the half-written temp never replaced the file
        assert temps(out) and read_metadata(out / "last.safetensors").history[-1]["stage"]["name"] == "gates"
    if fault.startswith("term"):
        err = " ".join(done.stderr.split())  # rich wraps long warnings
        assert "SIGTERM" in err and f"--resume {out}" in err
    assert cli_run(["finetune", "--resume", str(out)]) == 0
    assert_same_weights(load_file(out / "last.safetensors"), reference)
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]  # row 0, no duplicates
    assert temps(out) == []  # leftovers of the killed write are cleaned on resume


def test_sigterm_to_the_process_group_with_workers(ckpt, data, tmp_path, cli):
    """Preemption signals every process of the group, DataLoader workers included: the
    main process alone stops, saves a resumable state and exits 143; no worker crash.
    (Forked workers inherit the main process's handler; ``data._worker_init`` also
    makes spawned ones ignore the signal.)"""
    import time

    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS[:-2],
            "--save-every", "1", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GCT_SURGERY_FAULT", None)
    proc = subprocess.Popen([cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "state.pt").exists():  # training is under way, workers running
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.02)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-800:]
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert "SIGTERM" in " ".join(err.split()) and "--resume" in err, err
    state = read_state(out)
    assert state["stage_index"] < 2  # stopped early, and resumable:
    assert cli_run(["finetune", "--resume", str(out), "--json"]) == 0
    with open(out / "metrics.csv") as f:
        assert [r["stage"] for r in csv.DictReader(f)] == ["start", "gates", "full"]


def test_unknown_fault_spec_is_a_user_error(ckpt, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GCT_SURGERY_FAULT", "explode:now")
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"), *ARGS]
    assert cli_run(args) == 2
    assert "GCT_SURGERY_FAULT" in capsys.readouterr().err


# --- non-finite loss ----------------------------------------------------------------

NAN_TASK = '''
import torch
from gct_surgery.train.task import ClassificationTask


class NanAt(ClassificationTask):
    """Classification whose training loss is NaN at the training steps in BAD (1-based)."""
    BAD = {bad}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, output, target):
        loss = super().loss(output, target)
        if torch.is_grad_enabled():  # not validation
            self.calls += 1
            if self.calls in self.BAD:
                return loss * float("nan")
        return loss
'''


def nan_task(tmp_path: Path, bad: set[int]) -> str:
    path = tmp_path / "nan_task.py"
    path.write_text(NAN_TASK.replace("{bad}", repr(bad)))
    return f"{path}:NanAt"


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_files(ckpt, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS,
            "--task", nan_task(tmp_path, {2, 5}), "--skip-nonfinite", "1"]
    assert cli_run(args) == 2  # step 2 is skipped; step 5 is one too many
    err = capsys.readouterr().err
    assert "warning: non-finite loss (nan) at stage gates, epoch 1, step 2: batch skipped" in err
    error = err[err.index("error:"):]
    assert error.startswith("error: non-finite loss (nan) at stage 'full', epoch 1, step 2 of 3")
    assert "after skipping 1 such batch(es)" in error and error.count("\n") == 1
    # The files are those of the last good save: the end of the gates stage.
    state = read_state(out)
    assert (state["stage_index"], state["epoch"], state["step_in_epoch"]) == (0, 1, 0)
    last = load_file(out / "last.safetensors")
    assert_same_weights(last, state["model"])
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())
    assert read_metadata(out / "last.safetensors").history[-1]["stage"]["name"] == "gates"
    # Resumed with a larger allowance (the task's step count restarts: its step 2 of the
    # full stage is NaN again), the run skips that batch too, keeps the count, and ends.
    assert cli_run(["finetune", "--resume", str(out), "--skip-nonfinite", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nonfinite_skipped"] == 2 and doc["epochs"] == 2
    last = load_file(out / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def test_a_diverging_learning_rate_is_a_clear_error(ckpt, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|weights)|became non-finite") as e:
        finetune(ckpt, default_recipe().override(epochs=1, lr=1e12), config(data, out))
    assert "\n" not in str(e.value) and ("step" in str(e.value) or "epoch" in str(e.value))
    # Every file on disk is from a good save: finite weights, readable, resumable.
    state = read_state(out)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    last = load_file(out / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


# --- disk full ----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB tmpfs (needs root and a kernel that lets us mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs to fill ({e}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)




def test_disk_full_mid_run_keeps_the_previous_files(ckpt, data, small_disk):
    out = small_disk / "run"
    kept: dict[str, bytes] = {}

    def fill_after_first_epoch(event, info):
        if event == "epoch_end" and info["row"]["epoch"] == 1:
            kept.update({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})
            fill(small_disk)

    with pytest.raises(WriteError) as e:
        finetune(ckpt, RECIPE, config(data, out), on_event=fill_after_first_epoch)
    message = str(e.value)
    assert "could not write" in message and "No space left on device" in message
    assert "state.pt" in message and "unchanged" in message and "\n" not in message  # the mid-epoch save
    assert "--resume" in message
    assert kept and {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept
    assert temps(out) == []


def test_disk_full_at_start_is_one_line(ckpt, data, small_disk, capsys):
    fill(small_disk)
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(small_disk / "run"), *ARGS]
    assert cli_run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and "No space left on device" in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_spawned_workers_ignore_sigterm():
    """With the spawn start method (macOS; forkserver is Python 3.14's default) workers
    do not inherit the main process's handler: without ``data._worker_init`` a SIGTERM
    to the group kills them, and the main process crashes with "DataLoader worker ...
    exited unexpectedly" instead of saving its state."""
    import contextlib
    import time

    from torch.utils.data import TensorDataset

    from torch.utils.data import DataLoader

    from gct_surgery.train.data import _worker_init

    loader = DataLoader(TensorDataset(torch.arange(2000.0)), batch_size=4, num_workers=2,
                        worker_init_fn=_worker_init, multiprocessing_context="spawn")
    batches = iter(loader)
    next(batches), next(batches)  # one batch from each worker: both are past their init
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
    pids = [int(p) for p in children.stdout.split()]
    assert len(pids) >= 2
    for pid in pids:  # the workers, and multiprocessing's resource tracker (it ignores SIGTERM)
        with contextlib.suppress(ProcessLookupError):  # pgrep itself
            os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert sum(1 for _ in batches) == 2000 // 4 - 2  # every later batch still arrives
