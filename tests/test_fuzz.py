"""Seeded fuzzing of checkpoint reading: thousands of corrupt and hostile files, each
of which must end in a ``UserError`` (CLI: exit 2, one line), never a traceback, a
hang, a huge allocation or a payload that runs. The engine is
scripts/fuzz_checkpoints.py, which also runs larger sweeps on its own."""
from __future__ import annotations

import importlib.util
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_path

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261124
DEFAULT_CASES = 2000


def _load_engine():
    spec = importlib.util.spec_from_file_location("fuzz_checkpoints", ROOT / "scripts" / "fuzz_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_checkpoints"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


fuzz = _load_engine()


def _check(report, cases: int) -> None:
    print(f"\n{report.summary()}")
    assert report.cases == cases >= 2000
    assert not report.failures, "\n".join(report.failures[:20])
    assert set(report.by_category) == set(fuzz.CATEGORIES)
    # most mutants must be refused; the ones that load are bit flips inside tensor data
    assert report.outcomes["refused"] > 0.9 * report.cases
    assert report.slowest < fuzz.CASE_SECONDS


def test_fuzz_load_and_cli(tmp_path):
    _check(fuzz.fuzz(DEFAULT_CASES, SEED, tmp_path), DEFAULT_CASES)


@pytest.mark.slow
def test_fuzz_large(tmp_path):
    _check(fuzz.fuzz(20000, SEED + 1, tmp_path), 20000)


def _limit_memory():
    """4 GiB of address space: a huge allocation fails instead of swapping the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _refused_sample(tmp_path: Path, n: int) -> list[tuple[str, Path]]:
    """``n`` fuzzed files the library refuses, spread over the categories."""
    import gct_surgery
    from gct_surgery.errors import UserError

    seeds = fuzz.make_seeds(tmp_path / "seeds")
    rng = random.Random(SEED + 2)
    picked: dict[str, list[Path]] = {}
    for i in range(400):
        category, name, data = fuzz.make_case(rng, seeds)
        if len(picked.get(category, [])) >= max(1, n // len(fuzz.CATEGORIES)):
            continue
        path = tmp_path / f"case{i}{name}"
        path.write_bytes(data)
        try:
            gct_surgery.load(path)
        except UserError:
            picked.setdefault(category, []).append(path)
    sample = [(c, p) for c, paths in sorted(picked.items()) for p in paths]
    assert len(sample) >= n // 2
    return sample[:n]


@pytest.mark.parametrize("n", [pytest.param(8, id="sample8"), pytest.param(24, id="sample24", marks=pytest.mark.slow)])
def test_fuzz_cli_subprocess(tmp_path, n):
    sample = _refused_sample(tmp_path, n)
    for category, path in sample:
        proc = subprocess.run([cli_path(), "inject", str(path), "-o", str(tmp_path / "out.safetensors")],
                              capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory,
                              cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (category, path, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (category, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "seeds" / fuzz.MARKER).exists() and not (tmp_path / fuzz.MARKER).exists()
    print(f"\n{len(sample)} fuzzed files through the CLI as subprocesses: "
          f"{', '.join(sorted({c for c, _ in sample}))}")
