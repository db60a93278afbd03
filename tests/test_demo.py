"""`gct-surgery demo`: the whole pipeline on the bundled data, as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from safetensors.torch import load_file

import gct_surgery


def _demo(cli, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([cli, "demo", "--out", str(out), *extra], capture_output=True, text=True,
                          env=env, timeout=900)


def test_quick_demo_runs_every_step_and_beats_chance(cli, tmp_path):
    out = tmp_path / "demo"
    proc = _demo(cli, out, "--pretrain-epochs", "1", "--gates-epochs", "1", "--full-epochs", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    names = [s["name"] for s in result["steps"]]
    assert names == ["data", "existing model (trained briefly)", "inject", "finetune --stage gates",
                     "finetune --stage full", "export", "eval", "control (same recipe, gates at identity)"]
    steps = {s["name"]: s for s in result["steps"]}
    for name in ("existing model (trained briefly)", "inject", "finetune --stage gates",
                 "finetune --stage full", "eval", "control (same recipe, gates at identity)"):
        assert steps[name]["top1"] > 30.0, (name, steps[name])  # 10 classes: chance is 10%
    # injection is the identity: the gated model scores exactly what the base scored
    assert steps["inject"]["top1"] == steps["existing model (trained briefly)"]["top1"]
    # the exported model is the fine-tuned one
    assert steps["eval"]["top1"] == steps["finetune --stage full"]["top1"]
    assert result["gates"] > 0 and 0 < result["params_added"] < 0.01 * result["params_base"]
    assert {"difference", "ci95", "text"} <= set(result["verdict"]) and result["verdict"]["seeds"] == 1
    for f in result["files"]:
        assert os.path.exists(f), f
    # each step names the command that repeats it by hand
    assert steps["inject"]["command"].startswith("gct-surgery inject ")
    assert "--stage gates" in steps["finetune --stage gates"]["command"]
    # the gated model went through the gates stage: its gates moved, its base did not
    gated = load_file(str(out / "gated.safetensors"))
    after_gates = load_file(str(out / "runs/gates/last.safetensors"))
    assert gated.keys() == after_gates.keys()
    assert all(gated[k].equal(after_gates[k]) for k in gated if ".gate." not in k)
    assert any(not gated[k].equal(after_gates[k]) for k in gated if k.endswith(".gate.beta"))
    model = gct_surgery.load(out / "model.safetensors")
    assert sum(1 for n, _ in model.named_modules() if n.endswith(".gate")) == result["gates"]


def test_demo_refuses_to_overwrite_without_force(cli, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    proc = _demo(cli, out)
    assert proc.returncode == 2 and "not a demo folder" in proc.stderr
    assert (out / "precious.txt").read_text() == "mine"


@pytest.mark.slow
def test_default_demo_prints_the_table(cli, tmp_path):
    proc = _demo(cli, tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("gct-surgery demo", "top-1", "control", "did the gates help?", "parameters added", "files written",
                   "the same steps by hand", "gct-surgery finetune"):
        assert needle in proc.stdout
