"""Shared test setup: offline hub, a small thread count, the console script's path."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Never reach for the hub: offline, timm fails in 0.2 s instead of ~47 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The store of trusted code (gct_surgery/io/trust.py) is this test process's own, never
# the user's: what a test injects is remembered there, as for a user; a test that needs
# a machine where nothing is remembered empties it (tests/test_trust.py).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="gct-surgery-config-")
os.environ.pop("GCT_SURGERY_TRUST_FILE", None)

import pytest  # noqa: E402


def cli_path() -> str:
    """The installed ``gct-surgery`` console script (beside this interpreter)."""
    beside = Path(sys.executable).parent / "gct-surgery"
    return str(beside) if beside.exists() else (shutil.which("gct-surgery") or "gct-surgery")


@pytest.fixture(scope="session")
def cli() -> str:
    return cli_path()


def cli_here(*args, cwd=None):
    """A command through the CLI's entry point in this process, as a CompletedProcess
    (code, stdout, stderr): what a subprocess would give, without an interpreter start-up
    (~4 s of importing torch and timm). Tests about the installed command, signals,
    umask or start-up settings run it as a subprocess instead."""
    import contextlib
    import io
    import subprocess

    from gct_surgery.cli import run

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run([str(a) for a in args])
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread per test process: on a shared 2-core machine, two threads
    contend and make small training steps ~20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A real image folder (3 classes, 8 train and 4 val images each) for the run tests;
    a test module may define its own ``data``."""
    from fixtures.runs import write_folder

    return write_folder(tmp_path_factory.mktemp("data") / "imgs")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A gated ``timm:test_resnet`` checkpoint for 3 classes at 32 px."""
    from fixtures.runs import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "gated.safetensors")
