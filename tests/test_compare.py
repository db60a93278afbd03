"""The honest comparison: a control that differs from the GCT run only by the gates,
a verdict with an interval, an epoch-0 row in every run, and an EMA that averages.

Tiny real models (timm ``test_resnet``) on real PNG files at 32 px.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gct_surgery.cli import run as cli_run
from gct_surgery.train.compare import compare, plain_recipe
from gct_surgery.train.config import TrainConfig
from gct_surgery.train.loop import finetune
from gct_surgery.train.recipe import default_recipe, recipe_from_dict

from fixtures.runs import make_checkpoint




@pytest.fixture(scope="module")
def ckpt_other_head(tmp_path_factory) -> Path:
    """Trained for 5 classes: fine-tuning on 3 needs a new head (--num-classes 3)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt5") / "gated5.safetensors", num_classes=5)


def args(ckpt, data, out, *extra):
    return ["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--img-size", "32",
            "--batch-size", "8", "--workers", "0", "--epochs", "1", *extra]


def gate_params(ckpt: Path) -> int:
    return sum(t.numel() for k, t in load_file(ckpt).items() if ".gate." in k)


@pytest.fixture(scope="module")
def two_seeds(ckpt, data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cmp") / "run"
    return {"out": out, "code": cli_run(args(ckpt, data, out, "--baseline", "--seeds", "2", "--json"))}


def test_baseline_with_two_seeds_gives_the_verdict_and_every_run(two_seeds, capsys):
    assert two_seeds["code"] == 0
    doc = json.loads((two_seeds["out"] / "comparison.json").read_text())
    v = doc["verdict"]
    assert {"difference", "ci95", "seeds", "text", "metric"} <= set(v)
    assert v["seeds"] == 2 and v["metric"] == "top1" and len(v["ci95"]) == 2
    assert v["ci95"][0] <= v["difference"] <= v["ci95"][1]
    assert "higher is better" in v["text"]
    assert [r["seed"] for r in doc["runs"]] == [0, 1]
    for r in doc["runs"]:
        for arm in ("gct", "control"):
            assert [s["name"] for s in r[arm]["stages"]] == ["gates", "full"]
            assert set(r[arm]["best"]) >= {"top1", "val_loss", "epoch"}
        assert all(s["max_abs_gamma"] > 0 for s in r["gct"]["stages"])  # the gates moved
        # GCT minus control is the mean of the per-seed final differences
    diffs = [r["gct"]["final"]["top1"] - r["control"]["final"]["top1"] for r in doc["runs"]]
    assert v["difference"] == pytest.approx(sum(diffs) / 2)
    png = two_seeds["out"] / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_control_trains_exactly_the_gct_parameters_minus_the_gates(two_seeds, ckpt):
    doc = json.loads((two_seeds["out"] / "comparison.json").read_text())
    n_gates = gate_params(ckpt)
    for r in doc["runs"]:
        for g, c in zip(r["gct"]["stages"], r["control"]["stages"]):
            assert g["name"] == c["name"]
            assert g["trainable_params"] - c["trainable_params"] == n_gates, g["name"]
    # the head is not new here, so the control's gates stage trains nothing and changes nothing
    control = two_seeds["out"] / "seed-0" / "control"
    with open(control / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["start", "gates", "full"]
    assert rows[1]["val_loss"] == rows[0]["val_loss"] and rows[1]["top1"] == rows[0]["top1"]


def test_every_run_starts_with_an_epoch_zero_row(two_seeds):
    for arm in ("gct", "control"):
        with open(two_seeds["out"] / "seed-1" / arm / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows[0]["epoch"] == "0" and rows[0]["stage"] == "start"
        assert [int(r["epoch"]) for r in rows] == list(range(len(rows)))
    # before training the two arms are the same model: the same numbers
    first = {arm: next(csv.DictReader(open(two_seeds["out"] / "seed-1" / arm / "metrics.csv")))
             for arm in ("gct", "control")}
    assert first["gct"]["val_loss"] == first["control"]["val_loss"]


def test_a_new_head_trains_the_same_way_in_both_arms(ckpt_other_head, data, tmp_path):
    recipe = default_recipe().override(epochs=1)
    config = TrainConfig(data=str(data), out=str(tmp_path / "c"), batch_size=8, workers=0,
                         img_size=32, num_classes=3)
    c = compare(ckpt_other_head, recipe, config, seeds=1)
    gct, control = c.runs[0].gct, c.runs[0].control
    import timm

    features = timm.create_model("test_resnet", pretrained=False).num_features
    head = 3 * features + 3  # the new classifier: features -> 3 classes
    assert control.stages[0]["trainable_params"] == head  # the new head trains in the gates stage
    assert gct.stages[0]["trainable_params"] == head + gate_params(ckpt_other_head)
    # one seed, an accuracy: the interval is the binomial uncertainty of 12 images
    assert "binomial" in c.verdict.method and c.verdict.seeds == 1


def test_gates_held_at_identity_give_the_control_exactly(ckpt, data, tmp_path):
    """The fairness check: with the gates' learning rate 0 (and no warm-up, which would
    start from 1e-6), the GCT run computes what the control computes, so the two must
    agree: same data order, augmentation, head and BN handling."""
    recipe = recipe_from_dict({"stage": [
        {"name": "gates", "kind": "gates", "epochs": 1, "lr": 0.0, "warmup": 0.0},
        {"name": "full", "kind": "full", "epochs": 2, "lr": 0.0, "base_lr": 1e-2, "warmup": 0.0}]})
    config = TrainConfig(data=str(data), out=str(tmp_path / "c"), batch_size=8, workers=0, img_size=32)
    c = compare(ckpt, recipe, config, seeds=1)
    gct, control = c.runs[0].gct, c.runs[0].control
    assert gct.stages[-1]["max_abs_gamma"] == 0.0
    for a, b in zip(gct.rows, control.rows):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["top1"] == pytest.approx(b["top1"])
    assert control.rows[-1]["train_loss"] == pytest.approx(gct.rows[-1]["train_loss"], abs=1e-5)
    assert c.verdict.difference == pytest.approx(0.0)


def test_the_plain_reference_is_one_full_stage_of_the_same_total_epochs():
    plain = plain_recipe(default_recipe())
    assert [(s.kind, s.epochs) for s in plain.stages] == [("full", sum(s.epochs for s in default_recipe().stages))]
    assert plain.stages[0].effective_base_lr == default_recipe().stages[-1].effective_base_lr


def test_seeds_and_plain_need_baseline(ckpt, data, tmp_path, capsys):
    assert cli_run(args(ckpt, data, tmp_path / "x", "--seeds", "2")) == 2
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
