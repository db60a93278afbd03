"""Nothing silently wrong: the world around a run (issue 16).

A run folder belongs to one process; a resume checks its world (classes, data, the
state's tensors) before the first step; a cut or foreign ``run.json`` or ``state.pt`` is
one line; a ``--baseline`` comparison resumes as one unit;
checkpoints with NaN weights are named; every failure is one line. Real files, real
subprocesses of the ``gct-surgery`` command, real mounts where a full or read-only
disk is needed.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gct_surgery.cli import run as cli_run
from gct_surgery.io.checkpoint import read_metadata
from gct_surgery.train.config import TrainConfig
from gct_surgery.train.faults import RunError, StopFlag, Interrupted
from gct_surgery.train.outputs import RunDir, hold
from gct_surgery.train.loop import finetune
from gct_surgery.train.recipe import default_recipe

from fixtures.disks import fill

ARGS = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
        "--lr", "0.02", "--seed", "3", "--save-every", "2"]


def run_cli(cli: str, args: list[str], fault: str | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GCT_SURGERY_FAULT", None)
    if fault:
        env["GCT_SURGERY_FAULT"] = fault
    return subprocess.run([cli, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def one_error_line(stderr: str) -> str:
    """A user error is exactly one ``error:`` line, after any ``warning:`` lines."""
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("error:"), stderr[-2000:]
    assert all(l.startswith("warning:") for l in lines[:-1]), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[-1]




@pytest.fixture(scope="module")
def finished(ckpt, data, tmp_path_factory) -> Path:
    """A finished run: a resume of a copy of it checks its world, then has nothing to train."""
    out = tmp_path_factory.mktemp("runs") / "done"
    finetune(ckpt, default_recipe().override(epochs=1, lr=0.02),
             TrainConfig(data=str(data), out=str(out), batch_size=8, workers=0, seed=3,
                         img_size=32, save_every=2))
    return out


@pytest.fixture
def run_copy(finished, data, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run and of its data, to damage."""
    run, copy = tmp_path / "run", tmp_path / "data"
    shutil.copytree(finished, run)
    shutil.copytree(data, copy)
    state = torch.load(run / "state.pt", weights_only=True)
    state["run"]["config"]["data"] = str(copy)
    torch.save(state, run / "state.pt")
    return run, copy


# --- one process per run folder --------------------------------------------------------

WAIT_TASK = '''
import os, time
from gct_surgery.train.task import ClassificationTask


class WaitWhileGate(ClassificationTask):
    """Classification that holds its first loss while the GATE file exists."""

    def loss(self, output, target):
        while os.path.exists(GATE):
            time.sleep(0.05)
        return super().loss(output, target)
'''


def test_two_runs_on_one_folder_the_second_is_refused(ckpt, data, tmp_path, cli):
    gate = tmp_path / "gate"
    gate.touch()
    task = tmp_path / "wait_task.py"
    task.write_text(f"GATE = {str(gate)!r}\n" + WAIT_TASK)
    out = tmp_path / "c1"
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GCT_SURGERY_FAULT", None)
    first = subprocess.Popen([cli, *args, "--task", f"{task}:WaitWhileGate"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.json").exists() and time.monotonic() < deadline:  # written at start
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)
        assert (out / RunDir.LOCK).read_text().strip() == str(first.pid)
        second = run_cli(cli, args)  # the same command, started while the first runs
        line = one_error_line(second.stderr)
        assert second.returncode == 2
        assert f"{out} is in use by process {first.pid}" in line and "--out" in line
        again = run_cli(cli, ["finetune", "--resume", str(out)])  # nor may a resume touch it
        assert again.returncode == 2 and f"process {first.pid}" in one_error_line(again.stderr)
        assert first.poll() is None  # the live run was left alone
    finally:
        gate.unlink()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    # The first run's files are its own: the best row is the model in best.safetensors.
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    best = max(rows[1:], key=lambda r: float(r["top1"]))
    saved = read_metadata(out / "best.safetensors").history[-1]["metrics"]
    assert saved["epoch"] == int(best["epoch"]) and saved["top1"] == pytest.approx(float(best["top1"]))
    # The kernel released the lock with the process: the folder resumes at once.
    assert cli_run(["finetune", "--resume", str(out), "--json"]) == 0


def test_workers_of_a_killed_run_do_not_hold_its_folder(ckpt, data, tmp_path, cli):
    """SIGKILL to the main process alone: its DataLoader workers live on for a moment,
    but they closed their copy of the lock, so the folder resumes at once."""
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS[:4],
            "--workers", "2", *ARGS[6:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GCT_SURGERY_FAULT": "kill:after_step:2"}
    with open(tmp_path / "err", "w") as err:  # not a pipe: the orphaned workers keep pipes open
        done = subprocess.run([cli, *args], stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, (tmp_path / "err").read_text()[-2000:]
    with hold(out, create=False):  # at once: no worker holds the folder
        pass
    assert cli_run(["finetune", "--resume", str(out), "--json"]) == 0


def test_a_lock_is_not_taken_twice_in_one_process(tmp_path):
    with hold(tmp_path / "r"):
        with pytest.raises(RunError, match="in use by this process"):
            with hold(tmp_path / "r"):
                pass
    with hold(tmp_path / "r"):  # released at the end of the block
        pass


# --- resume checks its world ------------------------------------------------------------

def test_resume_after_a_class_rename_is_refused_naming_the_classes(run_copy, cli):
    run, data = run_copy
    names = sorted(p.name for p in (data / "train").iterdir())
    for split in ("train", "val"):
        (data / split / names[0]).rename(data / split / "zz_renamed")
    done = run_cli(cli, ["finetune", "--resume", str(run)])
    line = one_error_line(done.stderr)
    assert done.returncode == 2
    assert f"it trained on [{', '.join(names)}]" in line
    assert "zz_renamed" in line and f"gone: {names[0]}" in line and "shifted labels" in line


def test_resume_after_a_class_is_added_names_it_and_the_new_count(run_copy, capsys):
    run, data = run_copy
    for split in ("train", "val"):
        src = next((data / split).iterdir())
        shutil.copytree(src, data / split / "9_new")
    assert cli_run(["finetune", "--resume", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "new: 9_new" in line and "--num-classes 4" in line


def test_resume_warns_when_the_data_changed(run_copy, capsys):
    run, data = run_copy
    next(next((data / "train").iterdir()).glob("*.png")).unlink()
    assert cli_run(["finetune", "--resume", str(run), "--json"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "changed since the run started (train 24 -> 23 images)" in err


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "is not a readable train state"),
    (lambda p: torch.save({"model": {}}, p), "is not a train state this gct-surgery reads"),
])
def test_a_cut_or_foreign_state_file_is_one_line(run_copy, damage, says, capsys):
    run, _ = run_copy
    damage(run / "state.pt")
    assert cli_run(["finetune", "--resume", str(run)]) == 2
    assert says in one_error_line(capsys.readouterr().err)


def test_state_tensors_that_do_not_fit_the_model_are_refused(run_copy, capsys):
    run, _ = run_copy
    state = torch.load(run / "state.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(2, 2)
    torch.save(state, run / "state.pt")
    assert cli_run(["finetune", "--resume", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit the model" in line
    assert f"{name}: copying a param with shape torch.Size([2, 2])" in line


def _edit_record(run: Path, edit) -> None:
    state = torch.load(run / "state.pt", weights_only=True)
    edit(state["run"])
    torch.save(state, run / "state.pt")


@pytest.mark.parametrize("edit, says", [
    (lambda r: r.pop("recipe"), "no 'recipe'"),
    (lambda r: r["config"].update(bogus=1), "'bogus'"),
])
def test_a_state_file_whose_record_was_edited_is_one_line(run_copy, edit, says, capsys):
    run, _ = run_copy
    _edit_record(run, edit)
    assert cli_run(["finetune", "--resume", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "state.pt is damaged or was edited" in line and says in line


def test_run_json_is_a_copy_for_people_that_a_resume_never_reads(run_copy, capsys):
    """The state file is the one record of a run: run.json cut short or removed changes
    nothing, and a resume writes it again."""
    run, _ = run_copy
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text("{")
    assert cli_run(["finetune", "--resume", str(run)]) == 0
    again = json.loads((run / "run.json").read_text())
    assert again["recipe"] == record["recipe"] and again["data"] == record["data"]
    assert again["config"]["data"] != record["config"]["data"]  # the copy's data, as in state.pt


def test_resume_of_a_missing_folder_creates_nothing(tmp_path, capsys):
    assert cli_run(["finetune", "--resume", str(tmp_path / "nope")]) == 2
    assert "no run folder" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "nope").exists()


# --- signals -----------------------------------------------------------------------------

def test_sighup_saves_and_stops_like_sigterm(ckpt, data, tmp_path, cli):
    out = tmp_path / "run"
    done = run_cli(cli, ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS],
                   "hup:after_step:4")
    assert done.returncode == 128 + signal.SIGHUP, done.stderr[-2000:]
    err = " ".join(done.stderr.split())
    assert "SIGHUP: stopped at stage full" in err and f"--resume {out}" in err
    assert cli_run(["finetune", "--resume", str(out), "--json"]) == 0


def test_under_nohup_sighup_is_still_ignored(ckpt, data, tmp_path, cli):
    out = tmp_path / "run"
    done = run_cli(cli, ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS,
                         "--stage", "gates"], "hup:after_step:2",
                   preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]


TWICE_TASK = '''
import os, signal
from gct_surgery.train.task import ClassificationTask


class CtrlCTwice(ClassificationTask):
    """Two Ctrl-C in the middle of the 5th training step."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, output, target):
        import torch
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == 5:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return super().loss(output, target)
'''


def test_an_interrupted_json_run_exits_130_with_json_on_stdout(ckpt, data, tmp_path, cli):
    """--json runs click without standalone mode: the Exit code must still reach the shell."""
    task = tmp_path / "twice.py"
    task.write_text(TWICE_TASK)
    done = run_cli(cli, ["finetune", str(ckpt), "--data", str(data), "--out", str(tmp_path / "run"),
                         *ARGS, "--task", f"{task}:CtrlCTwice", "--json"])
    assert done.returncode == 130, done.stderr[-2000:]
    assert json.loads(done.stdout)["interrupted"] is True


def test_a_second_ctrl_c_says_it_stopped_and_what_is_on_disk(ckpt, data, tmp_path, cli):
    task = tmp_path / "twice.py"
    task.write_text(TWICE_TASK)
    out = tmp_path / "run"
    done = run_cli(cli, ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS,
                         "--task", f"{task}:CtrlCTwice"])
    assert done.returncode == 130, done.stderr[-2000:]
    err = " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    # The last save was the end of the gates stage's epoch (step 3 of 3 saves nothing mid-epoch).
    assert ("stopped at once by a second SIGINT: " f"{out} holds the last save (stage 'gates' "
            "with 1 epoch(s) and 0 step(s) done), untouched; continue with: gct-surgery "
            f"finetune --resume {out}") in err
    assert cli_run(["finetune", "--resume", str(out), "--json"]) == 0


def test_stop_flag_before_any_save(tmp_path):
    with StopFlag(tmp_path / "fresh") as flag:
        flag._handle(signal.SIGTERM, None)
        with pytest.raises(Interrupted) as e:
            flag._handle(signal.SIGTERM, None)
    assert e.value.hard and e.value.signum == signal.SIGTERM
    assert "before any resumable state was saved" in str(e.value)


# --- a comparison resumes as one unit ------------------------------------------------------

def test_an_interrupted_baseline_resumes_and_gives_its_verdict(ckpt, data, tmp_path, cli):
    out = tmp_path / "cmp"
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(out), *ARGS, "--baseline"]
    # GCT: 6 steps (gates, then full); the control trains the same 6, so the 8th step of
    # this process is the 2nd of the control's gates stage.
    done = run_cli(cli, args, "term:after_step:8")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert f"--resume {out} (the whole comparison)" in " ".join(done.stderr.split())
    assert (out / "seed-3" / "gct" / "result.json").is_file()
    assert not (out / "seed-3" / "control" / "result.json").exists()
    gct_last = (out / "seed-3" / "gct" / "last.safetensors").read_bytes()
    again = run_cli(cli, args)  # the same command again: the folder is a comparison
    assert again.returncode == 2 and f"--resume {out}" in one_error_line(again.stderr)
    done = run_cli(cli, ["finetune", "--resume", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished before" in done.stdout and "GCT" in done.stdout
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["verdict"]["text"] and [r["seed"] for r in doc["runs"]] == [3]
    assert (out / "seed-3" / "gct" / "last.safetensors").read_bytes() == gct_last  # not re-run
    with open(out / "seed-3" / "control" / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]


def test_a_damaged_comparison_plan_is_one_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "comparison-run.json").write_text('{"checkpoint": "x", "seeds": ')
    assert cli_run(["finetune", "--resume", str(out)]) == 2
    assert "comparison-run.json is damaged or was edited (not valid JSON" in one_error_line(capsys.readouterr().err)


# --- non-finite weights are named where they are ------------------------------------------------

@pytest.fixture(scope="module")
def nan_ckpt(ckpt, tmp_path_factory) -> tuple[Path, str]:
    with safe_open(str(ckpt), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(ckpt)
    name = next(k for k, v in sorted(tensors.items()) if v.dim() == 4)
    tensors[name].view(-1)[0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path, name


@pytest.mark.parametrize("command", ["export", "eval", "finetune"])
def test_nan_weights_are_named_in_the_file(nan_ckpt, data, tmp_path, command, capsys):
    path, name = nan_ckpt
    args = {"export": ["export", str(path), "-o", str(tmp_path / "x.safetensors")],
            "eval": ["eval", str(path), "--data", str(data), "--workers", "0", "--img-size", "32"],
            "finetune": ["finetune", str(path), "--data", str(data), "--out", str(tmp_path / "r"), *ARGS]}
    assert cli_run(args[command]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path} holds non-finite weights (first: {name}, 1 NaN of" in line
    assert "learning rate" not in line and not (tmp_path / "x.safetensors").exists()


# --- every message is text, never markup ---------------------------------------------------

def test_a_bracketed_key_is_one_line(ckpt, tmp_path, cli):
    with safe_open(str(ckpt), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(ckpt)
    tensors["[/boom]"] = torch.zeros(1)
    path = tmp_path / "boom.safetensors"
    save_file(tensors, path, metadata=metadata)
    done = run_cli(cli, ["export", str(path), "-o", str(tmp_path / "x.safetensors")])
    assert done.returncode == 2 and "[/boom]" in one_error_line(done.stderr)


def test_bracketed_image_names_print_as_themselves(ckpt, data, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    cls = next((copy / "train").iterdir())
    (cls / "weird[").mkdir()  # a sub-folder: the path reads .../weird[/x].png, a closing tag
    (cls / "weird[" / "x].png").write_bytes(b"")
    (cls / "photo [copy].png").write_bytes(b"not a png")
    out = tmp_path / "r"
    assert cli_run(["finetune", str(ckpt), "--data", str(copy), "--out", str(out), *ARGS,
                    "--stage", "gates"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "weird[/x].png (empty file" in err and "photo [copy].png (not an image" in err
    assert cli_run(["finetune", str(ckpt), "--data", str(copy), "--out", str(tmp_path / "s"),
                    *ARGS, "--strict"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "weird[/x].png" in line or "photo [copy].png" in line


def test_install_hints_keep_their_brackets(capsys):
    from gct_surgery.cli._output import error

    error("pip install 'gct-surgery[onnx]'")
    assert capsys.readouterr().err == "error: pip install 'gct-surgery[onnx]'\n"


# --- one error path for every write ---------------------------------------------------------

@pytest.fixture
def mount(tmp_path):
    """``mount(options)``: a real tmpfs at a new folder (root only), unmounted after."""
    mounted = []

    def make(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot mount a tmpfs ({e}); needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)




def test_an_output_that_is_a_folder_is_one_line(ckpt, tmp_path, cli):
    folder = tmp_path / "taken"
    folder.mkdir()
    for args in (["inject", "timm:test_resnet", "-o", str(folder)],
                 ["export", str(ckpt), "-o", str(folder)]):
        done = run_cli(cli, args)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"could not write {folder}: it is a folder" in one_error_line(done.stderr)


def test_an_out_that_is_a_file_is_one_line(ckpt, data, tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("mine")
    assert cli_run(["finetune", str(ckpt), "--data", str(data), "--out", str(taken), *ARGS]) == 2
    assert "a file of that name is in the way" in one_error_line(capsys.readouterr().err)
    assert taken.read_text() == "mine"


def test_read_only_locations_are_one_line(ckpt, data, mount, cli, capsys):
    ro = mount("ro,size=1m")
    for args in (["inject", "timm:test_resnet", "-o", str(ro / "g.safetensors")],
                 ["export", str(ckpt), "-o", str(ro / "x.safetensors")]):
        done = run_cli(cli, args)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Read-only file system" in one_error_line(done.stderr)
    assert cli_run(["finetune", str(ckpt), "--data", str(data), "--out", str(ro / "new" / "run"), *ARGS]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not create the run folder" in line and "Read-only file system" in line


def test_a_full_disk_during_a_safetensors_export_is_one_line(ckpt, mount, cli):
    disk = mount("size=64k")
    fill(disk)
    done = run_cli(cli, ["export", str(ckpt), "-o", str(disk / "x.safetensors")])
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_error_line(done.stderr)
    assert f"could not write {disk / 'x.safetensors'}: No space left on device" in line
    assert "free some space" in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no temp file left


def test_a_killed_export_leaves_no_temp_file_after_the_next(ckpt, tmp_path, cli):
    out = tmp_path / "x.safetensors"
    done = run_cli(cli, ["export", str(ckpt), "-o", str(out)], "kill:during_save:x.safetensors")
    assert done.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob(".x.safetensors.*.tmp")]  # the killed write's leftover
    assert run_cli(cli, ["export", str(ckpt), "-o", str(out)]).returncode == 0
    assert not list(tmp_path.glob(".*.tmp")) and out.is_file()


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    from gct_surgery.io.atomic import atomic_path, remove_stale_temps

    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        assert remove_stale_temps(tmp_path) == [] and tmp.exists()  # locked: alive
    assert (tmp_path / "out.bin").read_bytes() == b"half"
