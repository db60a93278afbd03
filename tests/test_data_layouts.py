"""Data layouts beyond train/ and val/ folders (CSV splits, a held-out share of train,
a fixed class map), the train augmentation's strength, and one-channel models.

Real images on disk (the bundled Fashion-MNIST PNGs); the CLI as a subprocess for the
CSV layout and --val-split."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from gct_surgery.errors import DataError
from gct_surgery.io.checkpoint import read_metadata
from gct_surgery.train.config import COLOR_JITTER, CROP_SCALE, HFLIP, TrainConfig
from gct_surgery.train.layouts import DataOptions, open_datasets, open_split, recorded_options
from gct_surgery.train.data import create_transform, resolve_data_config
from gct_surgery.train.state import read_state, recorded_run
from gct_surgery.train.task import ClassificationTask

from conftest import cli_here
from fixtures.runs import make_checkpoint, write_folder

RUN = ["--stage", "full", "--epochs", "1", "--batch-size", "6", "--workers", "0", "--img-size", "32"]
CFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("layouts") / "imgs")


def _csv_layout(folders: Path, root: Path) -> Path:
    """The same images as CSV splits under ``root/images``, one missing file listed in
    each split."""
    shutil.copytree(folders, root / "images")
    for split in ("train", "val"):
        rows = ["path,label"] + [f"{p.relative_to(root).as_posix()},{p.parent.name}"
                                 for p in sorted((root / "images" / split).rglob("*.png"))]
        rows.append(f"images/{split}/gone.png,{rows[1].split(',')[1]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _train_only(folders: Path, root: Path) -> Path:
    shutil.copytree(folders / "train", root / "train")
    return root


def _cli(cli: str, *args: str) -> subprocess.CompletedProcess:
    return cli_here(*args)  # the entry point in this process: no interpreter start-up


# --- CSV splits -----------------------------------------------------------------------

def test_csv_layout_trains_and_evaluates_counting_a_missing_file(folders, ckpt, tmp_path, cli):
    data = _csv_layout(folders, tmp_path / "csv")
    run = _cli(cli, "finetune", str(ckpt), "--data", str(data), "--out", str(tmp_path / "run"), *RUN, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["data"]["bad_files"] == 2  # the run reports train's and val's
    assert sorted(b["path"].rsplit("/", 3)[-2] for b in result["data"]["first_bad"]) == ["train", "val"]
    assert all("missing" in b["reason"] for b in result["data"]["first_bad"])
    info = read_state(tmp_path / "run")["run"]
    assert info["data"]["splits"] == {"train": 24, "val": 12}
    ev = _cli(cli, "eval", str(tmp_path / "run" / "last.safetensors"), "--data", str(data),
              "--workers", "0", "--json")
    assert ev.returncode == 0, ev.stderr
    scored = json.loads(ev.stdout)
    assert scored["samples"] == 12 and scored["data"]["bad_files"] == 1
    assert [row["images"] for row in scored["per_class"]] == [4, 4, 4]


def test_csv_under_strict_stops_at_the_missing_file(folders, tmp_path):
    data = _csv_layout(folders, tmp_path / "csv")
    train, _ = open_datasets(data, DataOptions())
    from gct_surgery.train.data import BadImageError, check_strict

    with pytest.raises(BadImageError, match="gone.png: missing"):
        check_strict(train.report)


def test_malformed_csv_is_one_line_naming_the_row(folders, tmp_path):
    data = _csv_layout(folders, tmp_path / "csv")
    (data / "train.csv").write_text("path,label\nimages/train/a.png\n")
    with pytest.raises(DataError, match="train.csv line 2: expected a path and a label"):
        open_datasets(data, DataOptions())
    (data / "train.csv").write_text("file,class\n")
    with pytest.raises(DataError, match="must name the columns"):
        open_datasets(data, DataOptions())


# --- a held-out share of train ----------------------------------------------------------

def test_val_split_is_disjoint_stratified_and_seeded(folders, tmp_path):
    data = _train_only(folders, tmp_path / "only")
    train, val = open_datasets(data, DataOptions(val_split=0.25, seed=3))
    kept, held = {p for p, _ in train.samples}, {p for p, _ in val.samples}
    assert not kept & held and len(kept | held) == 24
    assert sorted(t for _, t in val.samples) == [0, 0, 1, 1, 2, 2]  # 25% of 8 per class
    again = open_datasets(data, DataOptions(val_split=0.25, seed=3))[1]
    other = open_datasets(data, DataOptions(val_split=0.25, seed=4))[1]
    assert again.samples == val.samples != other.samples


def test_val_split_cli_trains_evaluates_and_resumes_on_the_held_out_files(folders, ckpt, tmp_path, cli):
    data = _train_only(folders, tmp_path / "only")
    out = tmp_path / "run"
    run = _cli(cli, "finetune", str(ckpt), "--data", str(data), "--out", str(out), *RUN,
               "--val-split", "0.25", "--seed", "1", "--json")
    assert run.returncode == 0, run.stderr
    info = read_state(out)["run"]["data"]
    assert info["val_split"] == {"fraction": 0.25, "seed": 1}
    assert info["splits"] == {"train": 18, "val": 6}
    # What --resume rebuilds (the config the state file records) holds out the same files.
    config, _, _ = recorded_run(out, read_state(out))
    task = ClassificationTask(DataOptions.from_config(config))
    _, val = task.datasets(data, CFG, augment=False)
    assert val.fingerprint() == info["fingerprint"]["val"]
    # eval --split val scores exactly those files; --split train the rest.
    meta = read_metadata(out / "last.safetensors")
    held = open_split(data, "val", recorded_options(meta))
    assert held.samples == val.samples
    rest = open_split(data, "train", recorded_options(meta))
    assert not {p for p, _ in rest.samples} & {p for p, _ in held.samples}
    ev = _cli(cli, "eval", str(out / "last.safetensors"), "--data", str(data), "--workers", "0", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["samples"] == 6


def test_val_split_with_a_val_split_and_no_val_split_at_all_are_one_line(folders, tmp_path, cli):
    with pytest.raises(DataError, match="drop --val-split"):
        open_datasets(folders, DataOptions(val_split=0.2))
    data = _train_only(folders, tmp_path / "only")
    with pytest.raises(DataError, match="pass --val-split 0.2"):
        open_datasets(data, DataOptions())
    with pytest.raises(DataError, match="pass --split train"):
        open_split(data, "val", DataOptions())


# --- a class map ------------------------------------------------------------------------

def test_class_map_fixes_the_indices_and_refuses_unknown_classes(folders, ckpt, tmp_path):
    from gct_surgery.train.loop import finetune
    from gct_surgery.train.recipe import default_recipe

    names = sorted(p.name for p in (folders / "train").iterdir())
    order = [names[2], names[0], names[1]]
    class_map = tmp_path / "classes.txt"
    class_map.write_text("".join(f"{n}\n" for n in order))  # timm's format: line number = index
    config = TrainConfig(data=str(folders), out=str(tmp_path / "run"), batch_size=6, workers=0,
                         img_size=32, class_map=str(class_map))
    result = finetune(ckpt, default_recipe().only("full").override(epochs=1), config)
    assert read_metadata(result.run_dir / "last.safetensors").data["class_names"] == order
    assert read_state(result.run_dir)["run"]["data"]["class_names"] == order
    train, _ = ClassificationTask(DataOptions(class_map=str(class_map))).datasets(folders, CFG, augment=False)
    assert all(label == order.index(Path(path).parent.name) for path, label in train.samples)
    class_map.write_text(f"{order[0]}\n{order[1]}\n")  # one name per line, a class missing
    with pytest.raises(DataError, match=f"lack: {order[2]}; add them to the --class-map"):
        open_datasets(folders, DataOptions(class_map=str(class_map)))


# --- augmentation strength --------------------------------------------------------------

def _steps(transform) -> dict[str, object]:
    return {type(t).__name__: t for t in transform.transforms}


def test_augmentation_flags_reach_timms_transform(folders):
    task = ClassificationTask(DataOptions(crop_scale=0.3, hflip=0.0, color_jitter=0.2))
    train, val = task.datasets(folders, CFG, augment=True)
    steps = _steps(train.transform)
    assert steps["RandomResizedCropAndInterpolation"].scale == (0.3, 1.0)
    assert "RandomHorizontalFlip" not in steps  # hflip 0: no flip at all
    assert steps["ColorJitter"].brightness == pytest.approx((0.8, 1.2))
    assert "RandomResizedCropAndInterpolation" not in _steps(val.transform)


def test_the_milder_default_is_in_the_code_the_cli_and_the_doc(folders):
    assert (CROP_SCALE, HFLIP, COLOR_JITTER) != (0.08, 0.5, 0.4)  # not timm's from-scratch setting
    config = TrainConfig(data=str(folders), out="unused")
    assert (config.crop_scale, config.hflip, config.color_jitter) == (CROP_SCALE, HFLIP, COLOR_JITTER)
    steps = _steps(create_transform(CFG, training=True))
    assert steps["RandomResizedCropAndInterpolation"].scale == (CROP_SCALE, 1.0)
    assert steps["RandomHorizontalFlip"].p == HFLIP
    doc = (Path(__file__).parents[1] / "docs" / "finetuning.md").read_text()
    assert f"`--crop-scale {CROP_SCALE} --hflip {HFLIP} --color-jitter {COLOR_JITTER}`" in doc
    with pytest.raises(Exception, match="--crop-scale 0"):
        TrainConfig(data="d", out="o", crop_scale=0)


# --- one input channel ------------------------------------------------------------------

def test_one_channel_timm_model_finetunes_and_evaluates_on_grey_and_rgb_images(folders, tmp_path):
    from gct_surgery.operations import inject_model, open_model
    from gct_surgery.train.evaluate import evaluate_checkpoint
    from gct_surgery.train.loop import finetune
    from gct_surgery.train.recipe import default_recipe

    data = tmp_path / "grey"
    shutil.copytree(folders, data)
    first = sorted((data / "train").rglob("*.png"))[0]
    Image.open(first).convert("RGB").save(first)  # a colour file among grey ones
    model, meta = open_model("timm:resnet10t", num_classes=3, in_chans=1)
    gated = tmp_path / "grey.safetensors"
    inject_model(model, meta, output=gated, input_size=[1, 32, 32])
    cfg = resolve_data_config(read_metadata(gated).data)
    assert cfg["input_size"][0] == 1 and len(cfg["mean"]) == len(cfg["std"]) == 1
    train, _ = ClassificationTask().datasets(data, cfg, augment=True)
    assert train[0][0].shape == (1, 32, 32)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), batch_size=6, workers=0)
    result = finetune(gated, default_recipe().only("full").override(epochs=1), config)
    assert result.rows[-1]["epoch"] == 1 and torch.isfinite(torch.tensor(result.rows[-1]["train_loss"]))
    r = evaluate_checkpoint(result.run_dir / "last.safetensors", data, workers=0)
    assert r.samples == 12 and 0 <= r.top1 <= 100
