"""The honest comparison: a control on the same budget (gamma held at 0, or the gates
removed with BatchNorm affine in their place), a verdict paired image by image, seeds
until the answer is clear, seeds on many machines, and JSON that any parser reads.

Tiny real models (timm ``test_resnet``) on real PNG files at 32 px.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gct_surgery.cli import run as cli_run
from gct_surgery.train.compare import compare
from gct_surgery.train.compare import plain_recipe
from gct_surgery.train.config import TrainConfig
from gct_surgery.train.loop import finetune
from gct_surgery.train.recipe import default_recipe, recipe_from_dict

from fixtures.runs import make_checkpoint, write_folder

FULL_ONLY_GATES_AT_ZERO = """
[[stage]]
name = "full"
kind = "full"
epochs = 1
lr = 0.0          # the gates never move: the GCT arm computes what its control computes
base_lr = 0.01
warmup = 0.0      # a warm-up would start the gates at 1e-6
"""


def strict(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity are refused."""
    def refuse(name):
        raise ValueError(f"not standard JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def ckpt_other_head(tmp_path_factory) -> Path:
    """Trained for 5 classes: fine-tuning on 3 needs a new head (--num-classes 3)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt5") / "gated5.safetensors", num_classes=5)


@pytest.fixture(scope="module")
def data60(tmp_path_factory) -> Path:
    """60 validation images: a rule-of-three bound (3/60 = 5 points) a test can sit above."""
    return write_folder(tmp_path_factory.mktemp("data60") / "imgs", train=8, val=20)


def args(ckpt, data, out, *extra):
    return ["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--img-size", "32",
            "--batch-size", "8", "--workers", "0", "--epochs", "1", *extra]


def gate_params(ckpt: Path) -> int:
    return sum(t.numel() for k, t in load_file(ckpt).items() if ".gate." in k)


def rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_seeds(ckpt, data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cmp") / "run"
    return {"out": out, "code": cli_run(args(ckpt, data, out, "--baseline", "--seeds", "2", "--json"))}


def test_baseline_with_two_seeds_gives_the_verdict_and_every_run(two_seeds):
    assert two_seeds["code"] == 0
    doc = strict((two_seeds["out"] / "comparison.json").read_text())
    v = doc["verdict"]
    assert {"metric", "difference", "ci95", "ci90", "seeds", "conclusion", "mde", "resolution",
            "method", "stopping_rule", "looks", "text"} <= set(v)
    assert v["seeds"] == 2 and v["metric"] == "top1" and len(v["ci95"]) == 2
    assert v["ci95"][0] <= v["difference"] <= v["ci95"][1]
    assert v["conclusion"] in ("equivalent", "gct_better", "control_better", "inconclusive")
    assert v["resolution"] == 0.5 and v["looks"] == 1  # top-1's default; one look: fixed seeds
    assert "higher is better" in v["text"]
    assert [r["seed"] for r in doc["runs"]] == [0, 1]
    for r in doc["runs"]:
        for arm in ("gct", "control"):
            assert [s["name"] for s in r[arm]["stages"]] == ["gates", "full"]
            assert set(r[arm]["best"]) >= {"top1", "val_loss", "epoch"}
            keys = {"trainable_params", "steps", "max_abs_gamma"}
            assert all(keys <= set(s) for s in r[arm]["stages"])
        assert all(s["max_abs_gamma"] > 0 for s in r["gct"]["stages"])  # the gates moved
        assert all(s["max_abs_gamma"] == 0 for s in r["control"]["stages"])  # gamma held at 0
    # GCT minus control is the mean of the per-seed final differences
    diffs = [r["gct"]["final"]["top1"] - r["control"]["final"]["top1"] for r in doc["runs"]]
    assert v["difference"] == pytest.approx(sum(diffs) / 2)
    png = two_seeds["out"] / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("comparison-run.json", "seed-0/seed.json", "seed-0/control/result.json",
                 "seed-1/gct/run.json"):
        strict((two_seeds["out"] / name).read_text())


def test_a_finished_arm_reads_back_and_so_does_the_older_file_shape(two_seeds, tmp_path):
    """``result.json`` is what a resumed comparison and ``gct-surgery verdict`` read; the
    shape written before the one-file run state (the result beside its rows) still reads."""
    from gct_surgery.train.outputs import read_arm_result

    arm = two_seeds["out"] / "seed-0" / "control"
    now = read_arm_result(arm)
    assert now.rows and now.metric_names == ("top1", "top5") and now.primary_metric == "top1"
    older = tmp_path / "control"
    older.mkdir()
    doc = json.loads((arm / "result.json").read_text())
    rows = doc.pop("rows")
    (older / "result.json").write_text(json.dumps({"result": {**doc, "last": rows[-1],
                                                              "epochs": 2}, "rows": rows}))
    then = read_arm_result(older)
    same = json.dumps(then.rows) == json.dumps(now.rows)  # NaN != NaN; their text is equal
    assert same and then.best == now.best and then.params == now.params


def test_the_control_trains_the_same_steps_minus_gamma(two_seeds, ckpt):
    doc = json.loads((two_seeds["out"] / "comparison.json").read_text())
    n_gates = gate_params(ckpt)
    for r in doc["runs"]:
        for g, c in zip(r["gct"]["stages"], r["control"]["stages"]):
            assert g["name"] == c["name"] and g["steps"] == c["steps"] > 0
            assert g["trainable_params"] - c["trainable_params"] == n_gates // 3, g["name"]
    # the control's gates stage trains its static gates: its rows move, at GCT's learning rates
    gct, control = (rows(two_seeds["out"] / "seed-0" / arm) for arm in ("gct", "control"))
    assert [r["stage"] for r in control] == ["start", "gates", "full"]
    assert control[1]["val_loss"] != control[0]["val_loss"]
    assert [r["lr"] for r in gct] == [r["lr"] for r in control]


def test_every_run_starts_with_an_epoch_zero_row(two_seeds):
    for arm in ("gct", "control"):
        rs = rows(two_seeds["out"] / "seed-1" / arm)
        assert rs[0]["epoch"] == "0" and rs[0]["stage"] == "start"
        assert [int(r["epoch"]) for r in rs] == list(range(len(rs)))
    # before training the two arms are the same model: the same numbers
    first = {arm: rows(two_seeds["out"] / "seed-1" / arm)[0] for arm in ("gct", "control")}
    assert first["gct"]["val_loss"] == first["control"]["val_loss"]


def test_one_seed_with_a_new_head_is_undetermined_and_its_control_folds(ckpt_other_head, data,
                                                                          tmp_path):
    """The control's gates stage trains the head and its static gates (beta, alpha) for
    GCT's steps at GCT's learning rate; gamma stays exactly 0, so the exported control
    folds into a plain model."""
    from gct_surgery import load
    from gct_surgery.core.gate import GCT
    from gct_surgery.io.export import export

    recipe = default_recipe().override(epochs=1)
    config = TrainConfig(data=str(data), out=str(tmp_path / "c"), batch_size=8, workers=0,
                         img_size=32, num_classes=3)
    c = compare(ckpt_other_head, recipe, config, seeds=1)
    gct, control = c.runs[0].gct, c.runs[0].control
    import timm

    features = timm.create_model("test_resnet", pretrained=False).num_features
    head = 3 * features + 3  # the new classifier: features -> 3 classes
    gates = gate_params(ckpt_other_head)
    assert gct.stages[0]["trainable_params"] == head + gates
    assert control.stages[0]["trainable_params"] == head + gates * 2 // 3  # gamma held
    assert [s["steps"] for s in control.stages] == [s["steps"] for s in gct.stages]
    assert [r["lr"] for r in control.rows[1:]] == [r["lr"] for r in gct.rows[1:]]
    assert c.verdict.conclusion == "undetermined" and c.verdict.seeds == 1
    assert "seed-to-seed spread is unknown" in c.verdict.text

    last = control.run_dir / "last.safetensors"
    assert all(t.abs().max() == 0 for k, t in load_file(last).items() if k.endswith(".gate.gamma"))
    result = export(last, tmp_path / "folded.safetensors", fold=True)
    assert result.fold.folded and not result.fold.kept  # every gate folds
    folded, gated = load(tmp_path / "folded.safetensors"), load(last)
    assert not any(isinstance(m, GCT) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), gated.eval()(x), atol=1e-5, rtol=0)


def test_identical_arms_are_equivalent_and_auto_stops_at_two_seeds(ckpt, data60, tmp_path, capsys):
    """Gates at learning rate 0 in a full-stage-only recipe: the GCT arm computes exactly
    what its control computes, so every image agrees. The difference is 0, its interval
    no wider than the rule-of-three bound, and with a resolution above the bound the
    answer is 'equivalent' as soon as --seeds auto may look (2 seeds)."""
    import numpy as np
    from gct_surgery.train.verdict import verdict

    (tmp_path / "r.toml").write_text(FULL_ONLY_GATES_AT_ZERO)
    out = tmp_path / "auto"
    code = cli_run(args(ckpt, data60, out, "--recipe", str(tmp_path / "r.toml"), "--baseline",
                        "--seeds", "auto", "--max-seeds", "4", "--resolution", "15",
                        "--metrics-format", "jsonl", "--json"))
    assert code == 0
    doc = strict(capsys.readouterr().out)
    v = doc["verdict"]
    assert v["conclusion"] == "equivalent" and v["seeds"] == 2 and v["difference"] == 0
    assert v["looks"] == 1 and "O'Brien-Fleming" in v["stopping_rule"]
    assert doc["stopped"] == "equivalent at 2 seeds" and not (out / "seed-2").exists()
    for line in (out / "seed-0" / "gct" / "metrics.jsonl").read_text().splitlines():
        strict(line)  # row 0's train loss and learning rates are null, not NaN

    # The same per-image results at one look (a fixed design): the rule-of-three bound.
    arms = [[np.asarray(load_file(out / f"seed-{s}" / a / "per_image.safetensors")["values"])
             for s in (0, 1)] for a in ("gct", "control")]
    assert all(np.array_equal(g, c) for g, c in zip(*arms)) and arms[0][0].shape == (60,)
    fixed = verdict(*arms, metric="top1", higher_is_better=True, resolution=6.0)
    bound = 3 / 60 * 100
    assert fixed.difference == 0 and fixed.ci90[1] - fixed.ci90[0] <= 2 * bound + 1e-9
    assert fixed.conclusion == "equivalent"


def test_gates_held_at_identity_give_the_identity_control_exactly(ckpt, data, tmp_path):
    """The fairness check for --control identity: with the gates' learning rate 0 (and no
    warm-up, which would start from 1e-6) the GCT run computes what the gate-free control
    computes; the control's gates stage trains BatchNorm's affine at the base lr (0 here)."""
    recipe = recipe_from_dict({"stage": [
        {"name": "gates", "kind": "gates", "epochs": 1, "lr": 0.0, "warmup": 0.0},
        {"name": "full", "kind": "full", "epochs": 2, "lr": 0.0, "base_lr": 1e-2, "warmup": 0.0}]})
    config = TrainConfig(data=str(data), out=str(tmp_path / "c"), batch_size=8, workers=0, img_size=32)
    c = compare(ckpt, recipe, config, seeds=1, control="identity")
    gct, control = c.runs[0].gct, c.runs[0].control
    assert gct.stages[-1]["max_abs_gamma"] == 0.0 and control.stages[0]["max_abs_gamma"] is None
    assert control.stages[0]["trained"].startswith("BatchNorm affine at lr 0")
    assert control.stages[0]["steps"] == gct.stages[0]["steps"] > 0
    for a, b in zip(gct.rows, control.rows):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["top1"] == pytest.approx(b["top1"])
    assert control.rows[-1]["train_loss"] == pytest.approx(gct.rows[-1]["train_loss"], abs=1e-5)
    assert c.verdict.difference == pytest.approx(0.0)


def test_a_checkpoint_with_trained_gates_is_refused(two_seeds, data, tmp_path, capsys):
    trained = two_seeds["out"] / "seed-0" / "gct" / "last.safetensors"
    assert cli_run(args(trained, data, tmp_path / "x", "--baseline")) == 2
    err = capsys.readouterr().err
    assert "start from the injected file" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "x").exists()


def test_seed_index_jobs_run_at_once_and_verdict_reads_the_seeds_present(ckpt, data, tmp_path, cli,
                                                                           capsys):
    """Two seeds of a 3-seed comparison as two jobs at the same time into one OUT (as a
    Slurm array would run them): each writes only its seed-S/; the verdict command then
    pairs the two present and names the one missing."""
    (tmp_path / "r.toml").write_text(FULL_ONLY_GATES_AT_ZERO.replace("lr = 0.0 ", "lr = 0.01"))
    out = tmp_path / "many"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    jobs = [subprocess.Popen([cli, *args(ckpt, data, out, "--recipe", str(tmp_path / "r.toml"),
                                         "--threads", "1", "--baseline", "--seeds", "3",
                                         "--seed-index", str(k))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for k in (0, 1)]
    for job in jobs:
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-2000:]
        assert "undetermined: one seed" in stdout
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == ["seed-0", "seed-1"]  # nothing shared: only each job's own seed
    assert cli_run(["verdict", str(out), "--json"]) == 0  # reads only: any time, anywhere
    doc = strict(capsys.readouterr().out)
    assert doc["missing_seeds"] == [2] and doc["verdict"]["seeds"] == 2
    assert [r["seed"] for r in doc["runs"]] == [0, 1]
    assert cli_run(["verdict", str(out)]) == 0
    assert "missing seeds (not finished): 2" in " ".join(capsys.readouterr().err.split())


def test_the_plain_reference_is_one_full_stage_with_the_recipes_handling():
    recipe = default_recipe()
    plain = plain_recipe(recipe)
    assert [(s.kind, s.epochs) for s in plain.stages] == [("full", recipe.total_epochs)]
    assert plain.stages[0].effective_base_lr == recipe.stages[-1].effective_base_lr
    assert plain.stages[0].bn_frozen == recipe.stages[-1].bn_frozen  # the recipe's BN handling
    assert plain.stages[0].head_lr is None  # a head trained only in full: the base lr
    new_head = plain_recipe(recipe, new_head=True).stages[0]
    assert new_head.head_lr == recipe.stages[0].lr  # a new head keeps the gates stage's lr
    assert "BN statistics frozen, the head at lr 0.01" in plain_recipe(recipe, True).source


def test_comparison_options_need_baseline(ckpt, data, tmp_path, capsys):
    for extra in (["--seeds", "2"], ["--seed-index", "1"], ["--control", "identity"]):
        assert cli_run(args(ckpt, data, tmp_path / "x", *extra)) == 2
        assert "--baseline" in capsys.readouterr().err


def _flat(path: Path) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for k, t in sorted(load_file(path).items())
                      if t.is_floating_point() and "running" not in k])


def test_the_ema_averages_over_a_twelve_step_run(ckpt, data, tmp_path):
    """24 images, batch 8, 4 epochs of one full stage: 12 updates. The EMA must move a
    real part of the way the raw weights moved (timm's decay restarted at 0 every stage
    and was 0.9998: after a short run the EMA was still nearly the first step's weights)."""
    recipe = recipe_from_dict({"stage": [{"name": "full", "kind": "full", "epochs": 4,
                                          "lr": 1e-2, "base_lr": 1e-2}]})
    out = tmp_path / "ema"
    config = TrainConfig(data=str(data), out=str(out), batch_size=8, workers=0, img_size=32, ema=True)
    result = finetune(ckpt, recipe, config)
    assert sum(1 for r in result.rows if r["epoch"] > 0) == 4
    start, raw, ema = _flat(ckpt), _flat(out / "last.safetensors"), _flat(out / "ema.safetensors")
    moved_raw, moved_ema = (raw - start).norm().item(), (ema - start).norm().item()
    assert moved_raw > 0 and moved_ema >= 0.3 * moved_raw
    assert not torch.equal(raw, ema)  # and it is an average, not the raw weights
    # best.safetensors is the validated EMA of its epoch
    assert torch.equal(_flat(out / "best.safetensors"), ema) == (result.best["epoch"] == 4)


def test_plain_adds_one_full_stage_of_the_total_epochs_and_its_own_verdict(ckpt, data, tmp_path,
                                                                           capsys):
    """--plain: a third arm, the fine-tune a user would run without gates (one full stage
    of the recipe's total epochs, gates removed), with its verdict against GCT."""
    out = tmp_path / "plain"
    assert cli_run(args(ckpt, data, out, "--baseline", "--plain", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    plain = doc["runs"][0]["plain"]
    assert [s["kind"] for s in plain["stages"]] == ["full"] and plain["gate_params"] == 0
    assert plain["final"]["epoch"] == 2  # the recipe's gates + full epochs, in one stage
    assert "against the plain fine-tune" in doc["plain_verdict"]["text"]
    assert doc["verdict"]["seeds"] == doc["plain_verdict"]["seeds"] == 1
