"""The README's commands run as written.

The fast test checks every `gct-surgery` line against the real command definitions (the
subcommand exists, every option exists). The slow test runs the workflow section for real,
in a scratch folder, after a short demo has made `demo-out/`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from gct_surgery.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Every command line in the README's ```sh blocks (comments stripped)."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _gct_args(line: str) -> list[str] | None:
    words = shlex.split(line.replace("$(which gct-surgery)", "gct-surgery"))
    if "gct-surgery" not in words:
        return None
    return words[words.index("gct-surgery") + 1:]


def test_every_readme_command_uses_real_subcommands_and_options():
    group = typer.main.get_command(app)
    checked = 0
    for line in readme_commands():
        args = _gct_args(line)
        if args is None:
            continue
        sub = group.commands.get(args[0])
        assert sub is not None, f"README uses unknown command {args[0]!r}: {line}"
        known = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)}
        for word in args[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"README uses unknown option {word} in: {line}"
        checked += 1
    assert checked >= 10


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


@pytest.mark.slow
def test_readme_workflow_runs_as_written(cli, tmp_path):
    """Runs every README workflow line in a scratch folder (minutes)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(cli).parent}{os.pathsep}{os.environ['PATH']}"}
    demo = subprocess.run([cli, "demo", "--out", "demo-out", "--pretrain-epochs", "1",
                           "--gates-epochs", "1", "--full-epochs", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr[-2000:]
    shutil.copytree(README.parent / "tests" / "fixtures", tmp_path / "tests" / "fixtures")
    from test_dense import write_readme_data

    write_readme_data(tmp_path)  # the saliency and segmentation folders its section reads
    ran = 0
    for line in readme_commands():
        if line.startswith(("make ", "source ")) or "torchrun" in line:
            continue  # setup lines and multi-process runs have their own tests
        proc = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
        ran += 1
    assert ran >= 10
    # the Python API block, in the same folder (it loads runs/full/best.safetensors)
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
