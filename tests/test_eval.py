"""``gct-surgery eval``: loss, top-1/top-5 and per-class accuracy, as a table or JSON;
and for a checkpoint fine-tuned with ``--task``, that task's metrics."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from gct_surgery.cli import run as cli_run
from gct_surgery.train.evaluate import evaluate_checkpoint, recorded_task
from gct_surgery.train.task import TaskError

from fixtures.runs import make_checkpoint, write_folder


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


def test_result_keeps_the_classification_attributes(setup):
    ckpt, data = setup
    r = evaluate_checkpoint(ckpt, data, workers=0, img_size=32, batch_size=4)
    assert r.task == "classification" and r.primary_metric == "top1" and r.higher_is_better
    assert set(r.metrics) == {"loss", "top1", "top5"} and r.per_class is r.breakdown
    assert r.samples == 15  # summed over batches of 4: the breakdown adds up across them
    assert sum(c["images"] for c in r.per_class) == 15


# --- a checkpoint fine-tuned with --task ------------------------------------------------

U2NET = Path(__file__).resolve().parent / "fixtures" / "u2net.py"
SALIENCY_TASK = f"{U2NET}:SaliencyTask"


def write_saliency_folder(root: Path, size: int = 24) -> Path:
    """``DATA/{train,val}/images/*.png`` and same-named ``masks/``: a bright square on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y:y + 10, x:x + 10] = 230
            mask[y:y + 10, x:x + 10] = 255
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def saliency(tmp_path_factory):
    """A U^2-Net-style checkpoint, and the same fine-tuned for one epoch with ``--task``."""
    root = tmp_path_factory.mktemp("saliency")
    data = write_saliency_folder(root / "sal")
    ckpt = make_checkpoint(root / "u2net.safetensors", spec=f"{U2NET}:build_u2net_small",
                           num_classes=None)
    run = root / "run"
    assert cli_run(["finetune", str(ckpt), "--data", str(data), "--out", str(run),
                    "--task", SALIENCY_TASK, "--stage", "gates", "--epochs", "1",
                    "--batch-size", "2", "--workers", "0"]) == 0
    return ckpt, run / "last.safetensors", data


def test_eval_scores_a_checkpoint_with_the_task_it_was_fine_tuned_with(saliency, capsys):
    _, tuned, data = saliency
    assert cli_run(["eval", str(tuned), "--data", str(data), "--workers", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == SALIENCY_TASK and doc["primary_metric"] == "mae"
    assert doc["higher_is_better"] is False and doc["samples"] == 3
    assert 0 <= doc["mae"] <= 1 and doc["loss"] > 0
    assert "top1" not in doc and "per_class" not in doc


def test_eval_task_option_scores_any_checkpoint(saliency, capsys):
    plain, _, data = saliency
    assert cli_run(["eval", str(plain), "--data", str(data), "--split", "train",
                    "--workers", "0", "--task", SALIENCY_TASK]) == 0
    out = capsys.readouterr().out
    assert "mae" in out and "images\t4" in out


def test_classification_of_a_non_classifier_is_one_line(saliency, capsys):
    _, tuned, data = saliency
    assert cli_run(["eval", str(tuned), "--data", str(data), "--workers", "0",
                    "--task", "classification"]) == 2
    err = capsys.readouterr().err
    # one error line (besides the warning that no mean/std was recorded for this model)
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert "not (N, classes)" in err and "--task" in err and len(lines) == 1


def history(task):
    return SimpleNamespace(history=[{"action": "recipe", "config": {"task": "a.py:Old"}},
                                    {"action": "recipe", "config": {"task": task}}])


def test_recorded_task_is_the_last_recipe_and_must_be_the_users_code():
    assert recorded_task(history(None)) is None
    assert recorded_task(history("classification")) is None
    assert recorded_task(history(SALIENCY_TASK)) == SALIENCY_TASK
    for hostile in ("timm:create_model", 7):  # not a task name at all
        with pytest.raises(TaskError, match="pass --task"):
            recorded_task(history(hostile))
    from gct_surgery.io.trust import UntrustedCodeError

    for hostile in ("os:getcwd", "subprocess:Popen"):  # code this user never chose
        with pytest.raises(UntrustedCodeError, match="names a task to run.*--trust-source"):
            recorded_task(history(hostile))
