"""`gct-surgery demo`: the whole pipeline on the bundled data, and a verdict over paired
seeds, as a user runs it."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from safetensors.torch import load_file

import gct_surgery
from gct_surgery.bundled_data import write_image_folder
from gct_surgery.errors import DataError

# A quick demo for the default suite: a tiny timm ResNet, 50 train and 20 val images a
# class, 2 seeds (the default is resnet10t on all 4,000 images and 3 seeds: the slow test).
QUICK = ("--model", "timm:test_resnet", "--per-class", "50,20", "--pretrain-epochs", "3",
         "--batch-size", "32", "--seeds", "2")
CONCLUSIONS = {"equivalent", "gct_better", "control_better", "inconclusive", "undetermined"}


def _demo(cli, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([cli, "demo", "--out", str(out), *extra], capture_output=True,
                          text=True, env=env, timeout=900)


def test_quick_demo_runs_every_step_and_ends_with_a_verdict(cli, tmp_path):
    out = tmp_path / "demo"
    proc = _demo(cli, out, *QUICK, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    names = [s["name"] for s in result["steps"]]
    assert names == ["data", "existing model (trained briefly)", "inject",
                     "finetune: gates, then full (GCT, seed 0)",
                     "control: the same recipe, gamma held at 0 (seed 0)",
                     "seeds 1: GCT and control", "export", "eval"]
    steps = {s["name"]: s for s in result["steps"]}
    gct_step = steps["finetune: gates, then full (GCT, seed 0)"]
    # the existing model is trained (10 classes: chance is 10%), and so are both arms
    for name in ("existing model (trained briefly)", "inject", gct_step["name"],
                 "control: the same recipe, gamma held at 0 (seed 0)", "eval"):
        assert steps[name]["top1"] > 30.0, (name, steps[name])
    # injection is the identity: the gated model scores exactly what the base scored
    assert steps["inject"]["top1"] == steps["existing model (trained briefly)"]["top1"]
    # the exported model is seed 0's GCT arm: the fine-tune is not run a second time
    assert steps["eval"]["top1"] == pytest.approx(gct_step["top1"], abs=1e-4)
    assert gct_step["output"] == str(out / "runs/compare/seed-0/gct/last.safetensors")
    assert not (out / "runs/finetune").exists() and not (out / "runs/gates").exists()
    assert sorted(p.name for p in (out / "runs/compare").glob("seed-*")) == ["seed-0", "seed-1"]
    assert result["gates"] > 0 and 0 < result["params_added"] < 0.01 * result["params_base"]

    # the verdict over the paired seeds: every number the demo prints, as standard JSON
    v = result["verdict"]
    assert v["seeds"] == 2 and v["conclusion"] in CONCLUSIONS
    assert v["conclusion"] != "undetermined"  # two seeds: the seed spread is known
    lo, hi = v["ci95"]
    assert lo <= v["difference"] <= hi and v["mde"] > 0 and v["images"] == 200
    seeds = result["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    assert seeds[0]["gct"] == gct_step["top1"]
    mean = sum(s["difference"] for s in seeds) / len(seeds)
    assert v["difference"] == pytest.approx(mean, abs=1e-6)

    # the gates stage trained the gates only, and they moved
    gates, full = result["stages"]
    assert gates["kind"] == "gates" and full["kind"] == "full"
    assert gates["trainable_params"] == result["params_added"]
    assert gates["max_abs_gamma"] > 0
    gated = load_file(str(out / "gated.safetensors"))
    tuned = load_file(gct_step["output"])
    assert gated.keys() == tuned.keys()
    assert any(not gated[k].equal(tuned[k]) for k in gated if k.endswith(".gate.beta"))

    for f in result["files"]:
        assert os.path.exists(f), f
    # each step names the command that repeats it by hand
    commands = result["commands"]
    assert steps["inject"]["command"].startswith("gct-surgery inject ")
    assert any("--baseline --seeds 2" in c for c in commands)
    assert "--baseline" not in gct_step["command"] and "--recipe" in gct_step["command"]
    assert commands[-1] == f"gct-surgery verdict {out / 'runs/compare'}"
    model = gct_surgery.load(out / "model.safetensors")
    assert sum(1 for n, _ in model.named_modules() if n.endswith(".gate")) == result["gates"]


def test_demo_refuses_to_overwrite_without_force(cli, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    proc = _demo(cli, out)
    assert proc.returncode == 2 and "not a demo folder" in proc.stderr
    assert (out / "precious.txt").read_text() == "mine"


def test_demo_refuses_a_bad_subset(cli, tmp_path):
    proc = _demo(cli, tmp_path / "demo", "--per-class", "30,x")
    assert proc.returncode == 2 and "--per-class" in proc.stderr


def test_bundled_subset_keeps_the_first_images_of_each_class(tmp_path):
    out = write_image_folder(tmp_path / "sub", per_class=(3, 2))
    for split, n in (("train", 3), ("val", 2)):
        folders = sorted((out / split).iterdir())
        assert len(folders) == 10
        assert all(len(list(f.glob("*.png"))) == n for f in folders)
    assert write_image_folder(out, per_class=(3, 2)) == out  # complete: a no-op
    with pytest.raises(DataError, match="already holds the bundled set"):
        write_image_folder(out)  # another subset never mixes into this one


@pytest.mark.slow
def test_default_demo_prints_the_table_and_the_verdict(cli, tmp_path):
    """The demo as `make demo` runs it: 3 seeds, and the verdict's numbers printed."""
    proc = _demo(cli, tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("gct-surgery demo", "top-1", "control", "did the gates help?",
                   "parameters added", "files written", "the same steps by hand",
                   "gct-surgery finetune", "--baseline --seeds 3", "gct-surgery verdict"):
        assert needle in proc.stdout, needle
    assert re.search(r"conclusion: (equivalent|gct_better|control_better|inconclusive)\b",
                     proc.stdout)
    # the numbers behind it, as finetune --baseline and gct-surgery verdict print them
    assert re.search(r"difference [+-]?\d\S* top1; 95% interval [+-]?\d\S* to [+-]?\d\S*; "
                     r"MDE \d", proc.stdout)
    assert "3 seeds x 1000 images" in proc.stdout
    assert re.search(r"existing model \(trained briefly\)\s+(\d+\.\d)%", proc.stdout)
    top1 = float(re.search(r"existing model \(trained briefly\)\s+(\d+\.\d)%",
                           proc.stdout).group(1))
    assert top1 > 70.0  # a trained model, not a random one
