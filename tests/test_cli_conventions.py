"""CLI conventions every command follows: --version, -h, readable help (no ``<bool>``,
choices shown), JSON errors under --json, resume that extends or refuses, --force,
progress lines above the live bar, table cells that never wrap, the Python floor and
YAML numbers. The CLI runs as a real subprocess on real files, except the runs that
train (resume, --force): those call the same entry point in this process (``here``),
which saves an interpreter start-up per command (``conftest.cli_here``)."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import cli_here as here

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
COMMANDS = ("inject", "finetune", "eval", "export", "inspect", "demo")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SMALL = ["--workers", "0", "--batch-size", "8"]


def gct(cli: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([cli, *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=600)


def run_in_pty(cmd: list[str], columns: int = 80) -> tuple[int, list[str]]:
    """Run ``cmd`` on a pseudo-terminal ``columns`` wide; its screen lines, ANSI removed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"} | {"TERM": "xterm"}
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = b""
    while True:
        try:
            ready, _, _ = select.select([leader], [], [], 0.5)
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            break
        out += chunk
        if not ready and proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(leader)
    text = ANSI.sub("", out.decode("utf-8", "replace"))
    return proc.returncode, re.split(r"\r\n|\r|\n", text)


# --- --version, -h, help ---------------------------------------------------------------

def test_version_prints_the_package_version(cli):
    r = gct(cli, "--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"gct-surgery {version('gct-surgery')}"


@pytest.mark.parametrize("args", [["-h"], ["finetune", "-h"], ["eval", "-h"]])
def test_short_help_works_on_the_app_and_on_a_command(cli, args):
    r = gct(cli, *args)
    assert r.returncode == 0, r.stderr
    assert "Usage: gct-surgery" in r.stdout and "-h" in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_without_a_type(cli, command):
    r = gct(cli, command, "--help")
    assert r.returncode == 0, r.stderr
    assert "<bool>" not in r.stdout


def test_help_shows_the_choices(cli):
    finetune = gct(cli, "finetune", "--help").stdout
    assert "<fast|reference>" in finetune and "<csv|jsonl>" in finetune
    evaluate = gct(cli, "eval", "--help").stdout
    assert "<fast|reference>" in evaluate and "<val|validation|train|test>" in evaluate


def test_a_choice_outside_the_list_is_refused(cli, tmp_path):
    r = gct(cli, "finetune", "x.safetensors", "--data", tmp_path, "-o", tmp_path / "r", "--impl", "quick")
    assert r.returncode == 2
    assert "quick" in r.stderr


# --- --json errors -----------------------------------------------------------------------

def test_json_errors_are_json_on_stdout(cli, tmp_path):
    r = gct(cli, "eval", tmp_path / "missing.safetensors", "--data", tmp_path, "--json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 2 and "missing.safetensors" in doc["error"]
    assert "missing.safetensors" in r.stderr  # people still read it on stderr

    usage = gct(cli, "eval", "--json")  # a usage error (no CHECKPOINT) too
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["exit_code"] == 2


# --- resume with options, --force ----------------------------------------------------------

def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_with_epochs_extends_a_finished_run_and_refuses_fixed_options(ckpt, data, tmp_path):
    run = tmp_path / "run"
    first = here("finetune", ckpt, "--data", data, "-o", run, "--epochs", "1", *SMALL)
    assert first.returncode == 0, first.stderr
    assert [r["stage"] for r in _rows(run)] == ["start", "gates", "full"]

    refused = here("finetune", "--resume", run, "--lr", "0.1")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "--lr cannot change when resuming: the run in" in refused.stderr

    too_few = here("finetune", "--resume", run, "--epochs", "0")
    assert too_few.returncode == 2

    more = here("finetune", "--resume", run, "--epochs", "3", "--json")
    assert more.returncode == 0, more.stderr
    rows = _rows(run)
    assert [r["stage"] for r in rows] == ["start", "gates", "full", "full", "full"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads(more.stdout)["epochs"] == 4
    from gct_surgery.train.state import read_state

    assert read_state(run)["run"]["history"][-1]["stages"] == {"gates": 1, "full": 3}
    info = json.loads((run / "run.json").read_text())  # the copy for people follows
    assert info["history"][-1]["event"] == "extended"
    assert info["history"][-1]["stages"] == {"gates": 1, "full": 3}
    assert [s["epochs"] for s in info["recipe"]["stages"]] == [1, 3]
    assert float(rows[-1]["lr"]) > 0  # the cosine was stretched, not run past its end


def test_force_replaces_a_run_folder_and_nothing_else(ckpt, data, tmp_path):
    run = tmp_path / "run"
    args = ["finetune", ckpt, "--data", data, "-o", run, "--stage", "gates", "--epochs", "1", *SMALL]
    assert here(*args).returncode == 0
    (run / "stray.txt").write_text("from the first run")
    again = here(*args)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    forced = here(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (run / "stray.txt").exists()
    assert len(_rows(run)) == 2  # one fresh run: row 0 and its epoch

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"not yours to delete")
    refused = here("finetune", ckpt, "--data", data, "-o", other, "--force", *SMALL)
    assert refused.returncode == 2 and "not a run folder" in refused.stderr
    assert (other / "cat.jpg").read_bytes() == b"not yours to delete"


# --- eval's class-count hint -----------------------------------------------------------------

def test_eval_names_both_class_counts_and_the_way_on(cli, data, tmp_path):
    from fixtures.runs import make_checkpoint

    two = make_checkpoint(tmp_path / "two.safetensors", num_classes=2)
    r = gct(cli, "eval", two, "--data", data, "--workers", "0")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "has 3 classes" in line and "head 2" in line and "--num-classes 3" in line


# --- terminals ----------------------------------------------------------------------------------

def test_progress_lines_never_share_a_line_with_the_bar(cli, ckpt, data, tmp_path):
    code, lines = run_in_pty([cli, "finetune", str(ckpt), "--data", str(data), "-o",
                              str(tmp_path / "run"), "--epochs", "1", *SMALL])
    assert code == 0, "\n".join(lines[-20:])
    stage_lines = [line for line in lines if "stage full (full)" in line]
    assert stage_lines, "\n".join(lines)
    for line in lines:
        if re.search(r"(stage \w+ \(|epoch \d+ \()", line):
            assert "━" not in line and not re.search(r"\d+/\d+", line), line
    assert any("1 epoch x" in line for line in stage_lines)  # and never "1 epochs"


def test_inspect_table_cells_never_wrap_at_80_columns(cli, ckpt):
    code, lines = run_in_pty([cli, "inspect", str(ckpt)], columns=80)
    assert code == 0, "\n".join(lines)
    cells_of = [line.replace("│", " ").split() for line in lines]
    rows = [cells for cells in cells_of if cells and cells[0].isdigit()]
    assert len(rows) >= 3
    for cells in rows:  # depth, module, C, six numbers, two percentages: all on one line
        assert len(cells) == 11, cells
        assert cells[-1].endswith("%") and cells[-2].endswith("%")
    last_row = max(i for i, cells in enumerate(cells_of) if cells and cells[0].isdigit())
    assert all(len(line) <= 80 for line in lines[:last_row + 1])  # the table fits; prose may wrap


# --- packaging and recipes -------------------------------------------------------------------------

def test_python_3_10_is_refused_at_install(tmp_path):
    """requires-python says what works: train/recipe.py needs tomllib (3.11)."""
    candidates = [shutil.which("python3.10"), *sorted(Path("/root/.pyenv/versions").glob("3.10*/bin/python3.10"))]
    old = next((str(c) for c in candidates if c and Path(c).exists() and subprocess.run(
        [str(c), "-m", "pip", "--version"], capture_output=True).returncode == 0), None)
    if old is None:  # a pyenv shim without 3.10 selected fails: the versions folder is tried too
        pytest.skip("no python3.10 with pip on this machine")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # the metadata alone: pyproject, README, an empty package
    (src / "gct_surgery").mkdir(parents=True)
    (src / "gct_surgery" / "__init__.py").write_text("")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(tmp_path / "wheel"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    r = subprocess.run([old, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "requires a different Python" in r.stdout + r.stderr


def test_yaml_numbers_written_as_text_are_numbers(tmp_path):
    from gct_surgery.errors import UserError
    from gct_surgery.train.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-3\nstages:\n  - kind: gates\n    warmup: 5e-2\n"
                    "  - kind: full\n    base_lr: 1e-5\n    weight_decay: 1e-2\n")
    recipe = load_recipe(path)
    assert [s.lr for s in recipe.stages] == [0.001, 0.001]
    assert recipe.stages[0].warmup == 0.05
    assert recipe.stages[1].base_lr == 1e-5 and recipe.stages[1].weight_decay == 0.01

    path.write_text("stages:\n  - kind: gates\n    lr: fast\n")
    with pytest.raises(UserError, match="lr must be a number, got 'fast'"):
        load_recipe(path)
