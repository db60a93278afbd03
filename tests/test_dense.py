"""The built-in dense tasks, checked against hand computations on a few known masks, and
their mask folders read from real PNGs on disk."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gct_surgery.errors import UserError
from gct_surgery.train.data import BadImageError, check_strict
from gct_surgery.train.dense import (IGNORE, MaskFolder, SaliencyTask, SegmentationTask,
                                     precision_recall, s_measure)

CONFIG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def target(masks, sizes=None) -> dict:
    masks = torch.stack([torch.as_tensor(m) for m in masks])
    sizes = sizes or [masks.shape[-2:]] * len(masks)
    return {"mask": masks, "size": torch.tensor([list(s) for s in sizes])}


def two_images():
    """A: a perfect map. B: 0.6 everywhere (level 153) on half foreground."""
    probs = torch.tensor([[[[1.0, 0.0]]], [[[0.6, 0.6]]]])  # (2, 1, 1, 2)
    return probs, target([[[1.0, 0.0]], [[1.0, 0.0]]])


def test_max_f_is_taken_from_mean_precision_and_recall_not_mean_f():
    probs, y = two_images()
    task = SaliencyTask("probabilities")
    sums = task.metric_sums(probs, y)
    metrics = task.finish(sums, 2)
    # thresholds 1..153: A P=1 R=1, B P=0.5 R=1 -> mean P=0.75, R=1
    f_low = 1.3 * 0.75 * 1 / (0.3 * 0.75 + 1)
    assert metrics["max_f"] == pytest.approx(f_low, abs=1e-9)
    mean_of_f = (1 + 1.3 * 0.5 / (0.3 * 0.5 + 1)) / 2  # what a mean of per-image F gives
    assert abs(metrics["max_f"] - mean_of_f) > 0.01
    assert metrics["mae"] == pytest.approx((0 + 0.5) / 2)
    assert task.per_image(probs, y).tolist() == pytest.approx([0.0, 0.5])


def test_s_measure_by_hand():
    """The structure measure as the authors' MATLAB code gives it, computed by hand."""
    half = torch.zeros(4, 4)
    half[:, :2] = 1  # the object: the left half
    assert s_measure(half, half) == pytest.approx(1.0)
    # A flat 0.5 map: each object score 2(0.5)/(0.25 + 1) = 0.8; the centroid (1-based
    # column 1.5 -> 2, row 2.5 -> 3, rounded half up) splits the object from the
    # background, so every block is flat in both maps and scores 1.
    assert s_measure(torch.full((4, 4), 0.5), half) == pytest.approx(0.5 * 0.8 + 0.5 * 1.0)
    corner = torch.zeros(4, 4)
    corner[:2, :2] = 1
    prob = corner.clone()
    prob[3, 3] = 0.5  # one background pixel half wrong
    background = torch.tensor([1.0] * 11 + [0.5])  # 1 - prob on the background
    mean, spread = background.mean().item(), background.std().item()  # MATLAB's std: n - 1
    objects = 0.25 * 1.0 + 0.75 * (2 * mean / (mean ** 2 + 1 + spread))
    regions = 3 * 0.25 * 1.0 + 0.25 * 0.0  # the block holding 0.5 has no structure in common
    assert s_measure(prob, corner) == pytest.approx(0.5 * objects + 0.5 * regions)
    assert s_measure(torch.full((3, 5), 0.2), torch.zeros(3, 5)) == pytest.approx(0.8)
    probs, y = two_images()
    task = SaliencyTask("probabilities")
    each = [s_measure(p[0], m) for p, m in zip(probs, y["mask"])]
    assert task.finish(task.metric_sums(probs, y), 2)["s_measure"] == pytest.approx(sum(each) / 2)


def test_precision_recall_by_hand():
    p, r = precision_recall(torch.tensor([0.0, 0.5, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # level 0, 128, 255, 255; truth F T T F
    assert p[0].item() == pytest.approx(0.5) and r[0].item() == 1.0
    assert p[128].item() == pytest.approx(2 / 3) and r[128].item() == 1.0
    assert p[129].item() == pytest.approx(0.5) and r[129].item() == pytest.approx(0.5)
    assert p[255].item() == pytest.approx(0.5) and r[255].item() == pytest.approx(0.5)


def test_logits_side_outputs_and_the_padding_left_out():
    task = SaliencyTask("logits")
    logit = torch.full((1, 1, 2, 2), 10.0)
    mask = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])  # second row: padding
    y = {"mask": mask, "size": torch.tensor([[1, 2]])}
    side = (logit, -logit)  # fused first, then a side output that is all wrong
    assert task.per_image(side, y).item() == pytest.approx(0.0, abs=1e-4)
    one = task.loss(logit, y).item()
    both = task.loss(side, y).item()
    assert one < 1e-3 and both > 5  # a loss on each output, each counted
    with pytest.raises(UserError, match="outside \\[0, 1\\].*--outputs logits"):
        SaliencyTask("probabilities").loss(logit, y)
    with pytest.raises(UserError, match="--outputs"):
        SaliencyTask("guess")
    with pytest.raises(UserError, match=r"\(1, 3, 2, 2\)"):
        task.loss(torch.zeros(1, 3, 2, 2), y)


def test_iou_loss_is_added_when_asked():
    probs = torch.tensor([[[[0.5, 0.5]]]])
    y = target([[[1.0, 0.0]]])
    bce = SaliencyTask("probabilities").loss(probs, y).item()
    both = SaliencyTask("probabilities", iou_loss=True).loss(probs, y).item()
    # IoU of soft 0.5,0.5 against 1,0: inter 0.5, union (0.5+1-0.5)+(0.5) = 1.5
    assert both - bce == pytest.approx(1 - 0.5 / 1.5, abs=1e-6)


def test_bce_on_probabilities_under_autocast():
    probs = torch.rand(2, 1, 4, 4)
    y = target(torch.rand(2, 4, 4).round())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SaliencyTask("probabilities").loss(probs.bfloat16(), y)
    assert torch.isfinite(loss) and loss.dtype == torch.float32


def test_miou_and_pixel_accuracy_by_hand():
    # 2 classes; image 1 (2x2): prediction 0 1 / 1 1, mask 0 1 / 0 255
    logits = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [5.0, 5.0]]]])
    y = target([[[0, 1], [0, IGNORE]]])
    task = SegmentationTask()
    metrics = task.finish(task.metric_sums(logits, y), 1)
    # class 0: inter 1, union 2 (pred {0,0}, mask {0,0},{1,0}); class 1: inter 1, union 2
    assert metrics["miou"] == pytest.approx(50.0)
    assert metrics["pixel_acc"] == pytest.approx(100 * 2 / 3)
    rows = task.per_image(logits, y).numpy()
    assert rows.tolist() == [[1, 1, 2, 2]] and task.reduce(rows) == pytest.approx(50.0)


def test_aux_output_weighted_like_torchvision_and_labels_checked():
    out = torch.zeros(1, 3, 2, 2)
    y = target([[[0, 1], [2, IGNORE]]])
    task = SegmentationTask()
    plain = task.loss({"out": out}, y).item()
    assert task.loss({"out": out, "aux": out}, y).item() == pytest.approx(1.5 * plain)
    with pytest.raises(UserError, match="class index 2.*2 classes.*--num-classes 3"):
        task.loss(torch.zeros(1, 2, 2, 2), y)
    with pytest.raises(UserError, match="'out'"):
        task.loss({"logits": out}, y)


def write_pair(root, split, stem, image_size=(12, 10), mask=None, mode="L"):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(0, 255, (*image_size[::-1], 3), dtype=np.uint8)).save(
        root / split / "images" / f"{stem}.jpg")
    if mask is None:
        mask = np.zeros(image_size[::-1], np.uint8)
        mask[2:6, 3:8] = 255
    Image.fromarray(mask, mode=mode).save(root / split / "masks" / f"{stem}.png")


def test_mask_folder_keeps_each_mask_at_its_size(tmp_path):
    write_pair(tmp_path, "val", "a", (12, 10))
    write_pair(tmp_path, "val", "b", (20, 8))
    val = MaskFolder(tmp_path / "val", CONFIG, labels=False, augment=False)
    image, y = val[0]
    assert image.shape == (3, 16, 16) and val.pad_to == (10, 20)
    assert y["size"].tolist() == [10, 12] and y["mask"].shape == (10, 20)
    assert y["mask"][2, 3].item() == 1.0 and y["mask"][0, 0].item() == 0.0
    assert y["mask"][:, 12:].eq(-1).all()  # padding is "no pixel"
    train = MaskFolder(tmp_path / "val", CONFIG, labels=False, augment=True)
    _, y = train[1]
    assert y["mask"].shape == (16, 16) and set(y["mask"].unique().tolist()) <= {0.0, 1.0}


def test_palette_masks_give_class_indices(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[0:3] = 2
    mask[5] = IGNORE
    image = Image.fromarray(mask, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    write_pair(tmp_path, "train", "a")
    image.save(tmp_path / "train" / "masks" / "a.png")
    _, y = MaskFolder(tmp_path / "train", CONFIG, labels=True, augment=False)[0]
    assert set(y["mask"].unique().tolist()) == {0, 2, IGNORE}


@pytest.mark.parametrize("break_it, message", [
    (lambda r: (r / "train/masks/a.png").unlink(), "a.jpg: no mask"),
    (lambda r: (r / "train/images/a.jpg").unlink(), "a.png: no image"),
    (lambda r: Image.new("L", (5, 5)).save(r / "train/masks/a.png"), "a.png: the mask is 5x5"),
    (lambda r: [p.unlink() for p in (r / "train/masks").iterdir()], "masks: no .png masks"),
])
def test_bad_mask_folders_are_named(tmp_path, break_it, message):
    write_pair(tmp_path, "train", "a")
    write_pair(tmp_path, "train", "b")
    break_it(tmp_path)
    with pytest.raises(UserError, match=message):
        MaskFolder(tmp_path / "train", CONFIG, labels=False, augment=False)


def test_unreadable_images_and_masks_are_skipped_and_reported(tmp_path):
    for stem in "abcd":
        write_pair(tmp_path, "train", stem)
    (tmp_path / "train/images/b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "train/masks/c.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    data = MaskFolder(tmp_path / "train", CONFIG, labels=False, augment=False)
    assert [i.stem for i, _ in data.pairs] == ["a", "d"] and len(data) == 2
    assert sorted(Path(p).name for p in data.report.bad) == ["b.jpg", "c.png"]
    with pytest.raises(BadImageError, match=r"b\.jpg: .*--strict"):
        check_strict(data.report)
    for stem in "ad":
        (tmp_path / f"train/images/{stem}.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"no image and mask of .*train can be read \(4 tried\)"):
        MaskFolder(tmp_path / "train", CONFIG, labels=False, augment=False)


def test_binary_masks_saved_as_0_and_255_are_refused_for_segmentation(tmp_path):
    """255 is "ignore" in a segmentation mask: a 0/255 mask would train on background only."""
    write_pair(tmp_path, "train", "a")  # 0 and 255: a saliency mask
    write_pair(tmp_path, "train", "b")
    assert len(MaskFolder(tmp_path / "train", CONFIG, labels=False, augment=False)) == 2
    with pytest.raises(UserError, match="hold only 0 and 255.*--task saliency"):
        MaskFolder(tmp_path / "train", CONFIG, labels=True, augment=False)
    border = np.zeros((10, 12), np.uint8)
    border[2:6, 3:8], border[2, 3:8] = 1, IGNORE  # VOC: an object with an ignored border
    write_pair(tmp_path, "train", "b", mask=border)
    assert len(MaskFolder(tmp_path / "train", CONFIG, labels=True, augment=False)) == 2


def test_a_class_index_too_large_names_its_mask(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[1, 1] = 7
    write_pair(tmp_path, "train", "a")
    write_pair(tmp_path, "train", "b", mask=mask)
    write_pair(tmp_path, "val", "a", mask=(mask > 0).astype(np.uint8))
    task = SegmentationTask()
    train, _ = task.datasets(tmp_path, CONFIG, augment=False)
    _, y = train[1]
    y = {k: v[None] for k, v in y.items()}
    with pytest.raises(UserError, match=r"b\.png: class index 7"):
        task.loss(torch.zeros(1, 3, 16, 16), y)


# --- the command line: inject, finetune --task, eval ---------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _run(cli, *args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([cli, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def write_segmentation_folder(root: Path, n: int = 4, size: int = 24) -> Path:
    """Real PNGs: class 1 a bright square, class 2 a dark one, 255 on their borders."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            image = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for label, value in ((1, 250), (2, 10)):
                y, x = rng.integers(0, size - 8, 2)
                image[y:y + 8, x:x + 8] = value
                mask[y:y + 8, x:x + 8] = label
                mask[y, x:x + 8] = IGNORE
            Image.fromarray(image).save(root / split / "images" / f"{i}.jpg")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def readme_section_commands() -> list[str]:
    """The sh lines of the README's "Saliency and segmentation" section."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Saliency and segmentation", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def write_readme_data(root: Path) -> None:
    from fixtures.ownnet.salnet_data import write_saliency_folder

    write_saliency_folder(root / "saliency-data")
    write_segmentation_folder(root / "segmentation-data")


def test_readme_saliency_and_segmentation_run_as_written(tmp_path, capsys, monkeypatch):
    """The README's section as written (each line's arguments through the CLI's entry
    point, in this process: tests/test_readme.py runs the installed command), then what a
    user relies on in what it wrote."""
    import shlex
    import shutil

    import gct_surgery.cli

    write_readme_data(tmp_path)
    shutil.copytree(FIXTURES, tmp_path / "tests" / "fixtures")
    monkeypatch.chdir(tmp_path)
    lines = readme_section_commands()
    assert len(lines) == 6 and all(line.startswith("gct-surgery ") for line in lines)
    for line in lines:
        code = gct_surgery.cli.run(shlex.split(line)[1:])
        assert code == 0, f"{line}\n{capsys.readouterr().err[-2000:]}"
    onnx = pytest.importorskip("onnx")  # torchvision's dict output: named by its keys
    graph = onnx.load(str(tmp_path / "segnet.onnx")).graph
    assert [o.name for o in graph.output] == ["out", "aux"]

    # saliency: MAE and max F, per-image MAE for --baseline, the recorded task for eval
    run_dir = tmp_path / "runs" / "saliency"
    final = list(csv.DictReader(open(run_dir / "metrics.csv")))[-1]
    assert 0 <= float(final["mae"]) <= 1 and 0 < float(final["max_f"]) <= 1
    per_image = load_file(run_dir / "per_image.safetensors")["values"]
    assert per_image.shape == (4,) and per_image.mean().item() == pytest.approx(float(final["mae"]))
    capsys.readouterr()
    code = gct_surgery.cli.run(["eval", str(run_dir / "last.safetensors"), "--data",
                                str(tmp_path / "saliency-data"), "--workers", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    doc = json.loads(out)
    assert doc["task"] == "saliency" and doc["samples"] == 4
    assert doc["mae"] == pytest.approx(float(final["mae"]), abs=1e-5)
    # eval opens only the split it scores: a train folder that is gone changes nothing
    import shutil

    shutil.rmtree(tmp_path / "saliency-data" / "train")
    code = gct_surgery.cli.run(["eval", str(run_dir / "last.safetensors"), "--data",
                                str(tmp_path / "saliency-data"), "--workers", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert json.loads(out)["mae"] == pytest.approx(doc["mae"], abs=1e-9)
    # probabilities or logits is never guessed
    code = gct_surgery.cli.run(["finetune", str(tmp_path / "u2net.gct.safetensors"), "--data",
                                str(tmp_path / "saliency-data"), "--task", "saliency", "-o",
                                str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert code == 2 and "--outputs" in err and err.strip().count("\n") == 0

    # segmentation: mIoU and pixel accuracy; a class index the model cannot give is named
    run_dir = tmp_path / "runs" / "segmentation"
    final = list(csv.DictReader(open(run_dir / "metrics.csv")))[-1]
    assert 0 <= float(final["miou"]) <= 100 and 0 <= float(final["pixel_acc"]) <= 100
    data = tmp_path / "segmentation-data"
    bad = np.zeros((24, 24), np.uint8)
    bad[3, 3] = 9
    Image.fromarray(bad).save(data / "val" / "masks" / "0.png")
    code = gct_surgery.cli.run(["eval", str(run_dir / "last.safetensors"), "--data", str(data),
                                "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "0.png: class index 9" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("factory, names", [
    ("segnet.py:build_sides", ["output0", "output1"]),  # the fused map, then a side output
    pytest.param("u2net.py:build_u2net_small", [f"output{i}" for i in range(4)],
                 marks=pytest.mark.slow),  # ~25 s
])
def test_an_onnx_export_names_every_output_in_order(tmp_path, factory, names):
    """A model with side outputs exports all of them, named and in the model's order, and
    the export says which is which."""
    ort = pytest.importorskip("onnxruntime")
    from gct_surgery import load
    from gct_surgery.core.model import flat_outputs
    from gct_surgery.io.export import export
    import gct_surgery.cli

    gated = tmp_path / "m.safetensors"
    assert gct_surgery.cli.run(["inject", str(FIXTURES / factory), "--input-size", "3,32,32",
                                "-o", str(gated)]) == 0
    result = export(gated, tmp_path / "m.onnx")
    assert result.output_names == names and result.to_dict()["output_names"] == names
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        want = flat_outputs(load(gated).eval()(x))
    got = session.run(None, {"input": x.numpy()})
    assert all(np.abs(g - w.numpy()).max() < 1e-4 for g, w in zip(got, want))


def test_output_names_follow_the_output_structure():
    from gct_surgery.core.model import output_names

    t = torch.zeros(1)
    assert output_names(t) == ["output"]
    assert output_names({"out": t}) == ["out"]  # torchvision without aux: still its key
    assert output_names({"out": t, "aux": t}) == ["out", "aux"]
    assert output_names((t, t, t)) == ["output0", "output1", "output2"]
