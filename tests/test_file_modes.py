"""Every file the tool writes has the mode the user's umask asks for: readable by the
team under umask 022, private under 077. mkstemp makes 0600 and safetensors recreates
the file it writes, so the mode is set on what lands, whatever wrote it."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from gct_surgery.io.atomic import atomic_folder, atomic_path, atomic_write_text

ARGS = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
        "--lr", "0.02", "--seed", "3", "--stage", "gates"]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one is restored after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask-022", "umask-077"])
def test_every_kind_of_write_follows_the_umask(umask, tmp_path, mask, file_mode, folder_mode):
    umask(mask)
    atomic_write_text(tmp_path / "metrics.csv", "epoch\n0\n")
    with atomic_path(tmp_path / "last.safetensors") as tmp:
        save_file({"w": torch.zeros(3)}, str(tmp))  # safetensors' own file
    with atomic_path(tmp_path / "state.pt") as tmp:
        torch.save({"step": 1}, tmp)
    with atomic_folder(tmp_path / "folder") as tmp:
        save_file({"w": torch.zeros(3)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
    files = ["metrics.csv", "last.safetensors", "state.pt", "folder/model.safetensors", "folder/config.json"]
    assert {f: oct(mode(tmp_path / f)) for f in files} == {f: oct(file_mode) for f in files}
    assert oct(mode(tmp_path / "folder")) == oct(folder_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["folder", *files[:3]])  # no temp left


def test_a_folder_written_again_keeps_other_files_and_replaces_its_own(tmp_path):
    folder = tmp_path / "export"
    for text in ("first", "second"):
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text(text)
    (folder / "README.md").write_text("mine")
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text("third")
    assert (folder / "config.json").read_text() == "third" and (folder / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_cli_outputs_are_readable_by_the_team_under_umask_022(cli, data, tmp_path):
    def run(*args):
        done = subprocess.run([cli, *map(str, args)], capture_output=True, text=True, timeout=600,
                              preexec_fn=lambda: os.umask(0o022),
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]

    ckpt, run_dir = tmp_path / "gated.safetensors", tmp_path / "run"
    run("inject", "timm:test_resnet", "--num-classes", "3", "--input-size", "3,32,32", "-o", ckpt)
    run("finetune", ckpt, "--data", data, "--out", run_dir, *ARGS)
    run("export", run_dir / "last.safetensors", "-o", tmp_path / "model.safetensors")
    written = [ckpt, tmp_path / "model.safetensors",
               *(run_dir / f for f in ("state.pt", "last.safetensors", "metrics.csv", "run.json"))]
    assert {str(p): oct(mode(p)) for p in written} == {str(p): "0o644" for p in written}
