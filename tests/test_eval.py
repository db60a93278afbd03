"""``gct-surgery eval``: loss, top-1/top-5 and per-class accuracy, as a table or JSON."""
from __future__ import annotations

import json
import subprocess

import pytest

from gct_surgery.cli import run as cli_run
from gct_surgery.train.loop import evaluate_checkpoint

from test_finetune import make_checkpoint, write_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_folder(root / "imgs", train=2, val=5)
    ckpt = make_checkpoint(root / "c.safetensors")
    return ckpt, data


def test_library_result_is_consistent(setup):
    ckpt, data = setup
    r = evaluate_checkpoint(ckpt, data, workers=0, img_size=32)
    assert r.samples == 15 and len(r.per_class) == 3
    assert all(c["images"] == 5 for c in r.per_class)
    # top-1 is the image-weighted mean of the per-class accuracies; top-5 of 3 classes is 100.
    assert r.top1 == pytest.approx(sum(c["top1"] * c["images"] for c in r.per_class) / 15)
    assert r.top5 == pytest.approx(100.0)
    assert r.loss > 0


def test_cli_json(setup, capsys):
    ckpt, data = setup
    assert cli_run(["eval", str(ckpt), "--data", str(data), "--workers", "0", "--img-size", "32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"loss", "top1", "top5", "per_class", "samples"}
    assert [c["class"] for c in doc["per_class"]] == ["0_t-shirt_top", "1_trouser", "2_pullover"]


def test_cli_table_as_subprocess(setup, cli):
    ckpt, data = setup
    out = subprocess.run([cli, "eval", str(ckpt), "--data", str(data), "--split", "train",
                          "--workers", "0", "--img-size", "32"], capture_output=True, text=True, check=True)
    assert "per-class accuracy" in out.stdout and "1_trouser" in out.stdout
    assert "images\t6" in out.stdout  # the train split: 2 images x 3 classes


def test_missing_split_is_one_line(setup, capsys):
    ckpt, data = setup
    assert cli_run(["eval", str(ckpt), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "no test split" in err and err.count("\n") == 1


def test_more_classes_than_the_model_is_refused(setup, tmp_path, capsys):
    ckpt, _ = setup
    data = write_folder(tmp_path / "five", train=1, val=1, classes=5)
    assert cli_run(["eval", str(ckpt), "--data", str(data), "--workers", "0"]) == 2
    assert "5 classes" in capsys.readouterr().err
