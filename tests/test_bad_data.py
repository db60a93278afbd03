"""Broken image data: real folders holding truncated, empty, non-image, unreadable and
odd-mode files. Bad files are skipped and counted (also from DataLoader worker
processes), ``--strict`` stops at the first one naming it, labels follow class folder
names even when a folder is empty, and every image mode becomes the right RGB.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gct_surgery.cli import run as cli_run
from gct_surgery.errors import DataError
from gct_surgery.train.data import DataReport, make_loader, read_image, report_lines, start_epoch, to_rgb
from gct_surgery.train.layouts import open_split

from fixtures.runs import make_checkpoint

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_REASON = ("running as root, which ignores file permissions, and unable to drop to "
               "another user: the broken symlink, the pipe and the zero-byte file stand in")
CLASSES = ["a_good", "b_modes", "c_empty", "d_last"]


def good_png(path: Path, seed: int, size: int = 20) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def encoded(fmt: str, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def odd_modes(folder: Path) -> dict[str, tuple]:
    """One image of each unusual mode, and the RGB value its pixel (0, 0) must become."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 90).save(folder / "grey.png")
    Image.new("1", (8, 8), 1).save(folder / "bilevel.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(folder / "rgba_half.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "rgba_clear.png")  # hidden colour black
    Image.new("LA", (8, 8), (0, 0)).save(folder / "la_clear.png")
    palette = [10, 20, 30, 200, 100, 50] + [0] * 762
    p = Image.new("P", (8, 8), 1)
    p.putpalette(palette)
    p.save(folder / "palette.png")
    p.save(folder / "palette_clear.png", transparency=1)  # index 1 is transparent
    Image.new("CMYK", (8, 8), (0, 0, 0, 128)).save(folder / "cmyk_grey.jpg", quality=100)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "cmyk_red.jpg", quality=100)
    sixteen = np.full((8, 8), 32896, np.uint16)  # 0x8080: 128 on 8 bits
    sixteen[0, 0] = 1000                           # 3.9 -> 4 (PIL's convert clips it to 255)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    return {
        "grey.png": (90, 90, 90), "bilevel.png": (255, 255, 255),
        "rgba_half.png": (255, 127, 127),          # red at 50% over white
        "rgba_clear.png": (255, 255, 255), "la_clear.png": (255, 255, 255),
        "palette.png": (200, 100, 50), "palette_clear.png": (255, 255, 255),
        "cmyk_grey.jpg": (127, 127, 127), "cmyk_red.jpg": (255, 0, 0),
        "sixteen.png": (4, 4, 4),
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    """DATA/{train,val}/<class>/ with every kind of trouble a scraped folder holds."""
    root = tmp_path_factory.mktemp("messy") / "data"
    a = root / "train" / "a_good"
    a.mkdir(parents=True)
    for i in range(4):
        good_png(a / f"ok{i}.png", i)
    (a / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (a / "notes.txt").write_text("scraped from somewhere\n")
    (a / "._ok0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (a / "empty.png").write_bytes(b"")
    (a / "cut.jpg").write_bytes(encoded("jpeg")[:600])
    (a / "cut.png").write_bytes(encoded("png")[:1500])
    (a / "text.jpg").write_text("<html>404 not found</html>")
    (a / "gone.png").symlink_to(root / "nowhere.png")
    os.mkfifo(a / "pipe.png")  # opening it would block forever
    (a / "folder.png").mkdir()  # a folder named like an image: walked, its image counts
    good_png(a / "folder.png" / "inside.png", 9)
    expected = odd_modes(root / "train" / "b_modes")
    (root / "train" / "c_empty").mkdir()
    d = root / "train" / "d_last"
    d.mkdir()
    for i in range(3):
        good_png(d / f"d{i}.png", 20 + i)
    for name in ("a_good", "b_modes", "d_last"):
        (root / "val" / name).mkdir(parents=True)
        good_png(root / "val" / name / "v.png", 30)
    (root / "val" / "c_empty").mkdir()
    (root / "val" / "d_last" / "zero.png").write_bytes(b"")
    return {"root": root, "modes": expected,
            "decode_bad": {"empty.png", "cut.jpg", "cut.png", "text.jpg"},
            "scan_bad": {"gone.png", "pipe.png"}}


def tensor_transform(size: int = 16):
    from gct_surgery.train.data import create_transform, resolve_data_config

    return create_transform(resolve_data_config({"input_size": [3, size, size]}), training=False)


def names(paths) -> set[str]:
    return {Path(p).name for p in paths}


# --- image modes ----------------------------------------------------------------------

def test_every_mode_becomes_the_right_rgb(messy):
    for name, rgb in messy["modes"].items():
        img = read_image(messy["root"] / "train" / "b_modes" / name)
        assert img.mode == "RGB" and img.size == (8, 8), name
        got = img.getpixel((0, 0))
        assert max(abs(g - e) for g, e in zip(got, rgb)) <= 2, (name, got, rgb)
    # The 16-bit image is scaled, not clipped: its 0x8080 pixels become 128 (PIL alone: 255).
    sixteen = Image.open(messy["root"] / "train" / "b_modes" / "sixteen.png")
    assert sixteen.mode == "I;16" and sixteen.convert("RGB").getpixel((1, 1)) == (255, 255, 255)
    assert to_rgb(sixteen).getpixel((1, 1)) == (128, 128, 128)


# --- scanning: labels, ignored files, files that cannot be opened ----------------------

def test_labels_follow_folder_names_and_an_empty_class_is_reported(messy, caplog):
    with caplog.at_level("WARNING"):
        ds = open_split(messy["root"], "train")
    assert ds.classes == CLASSES and ds.class_to_idx["d_last"] == 3  # not shifted to 2
    labels = {Path(p).name: t for p, t in ds.samples}
    assert labels["d0.png"] == 3 and labels["ok0.png"] == 0 and labels["grey.png"] == 1
    assert labels["inside.png"] == 0  # below a class folder: that class
    assert ds.report.empty_classes == ["c_empty"]
    assert "c_empty holds no images; it keeps label 2" in caplog.text
    assert names(ds.report.ignored) == {".DS_Store", "notes.txt", "._ok0.png"}
    # The scan's (never opened: the pipe would hang) and the decoder's, at open
    assert names(ds.report.bad) == messy["scan_bad"] | messy["decode_bad"]
    assert ds.report.bad[str(messy["root"] / "train" / "a_good" / "gone.png")] == "broken symlink"
    assert not names(p for p, _ in ds.samples) & (messy["scan_bad"] | {".DS_Store", "notes.txt"})


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted_across_workers(messy, workers, training):
    ds = open_split(messy["root"], "train", transform=tensor_transform())
    assert len(ds) % 2 == 0  # batches of 2: a training epoch also visits every index once
    loader = make_loader(ds, 2, training=training, workers=workers)
    images, labels = 0, []
    for x, y in loader:
        assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all()
        assert len(y) == 2 or not training  # training: a bad sample is replaced, not dropped
        images += len(y)
        labels += y.tolist()
    # Training replaces each bad sample by a readable one of its class; evaluation drops it.
    assert images == len(ds) - (0 if training else len(messy["decode_bad"]))
    report = ds.report  # complete before any worker started
    assert names(report.bad) == messy["decode_bad"] | messy["scan_bad"]
    in_class = sum(1 for _, t in ds.samples if t == 0)  # the bad files are all a_good's
    assert labels.count(0) == in_class - (0 if training else len(messy["decode_bad"]))
    # a_good: 4 bad of 9 files, far above the 5% at which a class is warned about
    assert report.bad_share == {"a_good": [4, 9]}
    reasons = {Path(p).name: r for p, r in report.bad.items()}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["cut.jpg"] == reasons["cut.png"] == "truncated image"
    assert reasons["text.jpg"] == "not an image PIL can read"
    assert set(labels) == {0, 1, 3}


def test_the_same_bad_file_replaced_the_same_way_every_time(messy):
    """A bad sample is replaced by a readable image of its own class, chosen from
    (seed, epoch, index) only: a fresh dataset (as after a resume) picks the same one,
    and the draw is made afresh each epoch."""
    ds, fresh = open_split(messy["root"], "train"), open_split(messy["root"], "train")
    index = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("empty.png"))
    ds.seed = fresh.seed = 7
    ds.epoch = fresh.epoch = 3
    chosen = ds.pick(index)
    assert chosen != index and fresh.pick(index) == chosen == ds.pick(index)
    assert ds.samples[chosen][1] == 0 and ds.samples[chosen][0] not in ds.report.bad
    img, target = ds[index]
    assert target == 0 and np.array_equal(np.asarray(img), np.asarray(read_image(ds.samples[chosen][0])))
    picks = set()
    for epoch in range(12):
        ds.epoch = epoch
        picks.add(ds.pick(index))
    assert all(ds.samples[j][1] == 0 and ds.samples[j][0] not in ds.report.bad for j in picks)
    assert len(picks) > 1  # a random image of the class, not always "the next one"


def unreadable_case(root: Path, drop_to: int | None = None) -> None:
    """A file and a folder without read permission: skipped and named. ``drop_to``: a
    uid to become first (root ignores permissions), after warming up every import."""
    cls = root / "train" / "a"
    cls.mkdir(parents=True)
    good_png(cls / "ok.png", 0)
    locked = good_png(cls / "locked.png", 1)
    sub = cls / "sub"
    sub.mkdir()
    good_png(sub / "x.png", 2)
    tf = tensor_transform()
    list(make_loader(open_split(root, "train", transform=tf), 2, training=False))  # imports, as root
    locked.chmod(0)
    sub.chmod(0)
    if drop_to is not None:
        os.setgid(drop_to)
        os.setuid(drop_to)
    ds = open_split(root, "train", transform=tf)
    assert ds.report.bad == {str(sub): "cannot list folder: Permission denied",
                             str(locked): "permission denied"}
    assert sum(len(y) for _, y in make_loader(ds, 2, training=False)) == 1


def test_unreadable_file_and_folder_are_skipped(tmp_path):
    if not IS_ROOT:
        unreadable_case(tmp_path / "d")
        return
    # Root reads everything: run the case in a child process that becomes `nobody`.
    import subprocess
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="gct-unreadable-"))  # /tmp, reachable by nobody
    root.chmod(0o755)
    script = ("import sys; sys.path[:0] = [sys.argv[1]]; import test_bad_data as t; "
              "from pathlib import Path; t.unreadable_case(Path(sys.argv[2]) / 'd', drop_to=65534); "
              "print('checked as uid', __import__('os').getuid())")
    try:
        done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(root)],
                              capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if "Operation not permitted" in done.stderr and "setuid" in done.stderr:
        pytest.skip(ROOT_REASON)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checked as uid 65534" in done.stdout


def test_a_split_with_no_readable_image_is_one_clear_error(tmp_path, capsys):
    ds_root = tmp_path / "d"
    (ds_root / "val" / "a").mkdir(parents=True)
    (ds_root / "val" / "a" / "x.png").write_bytes(b"")
    (ds_root / "val" / "a" / "y.jpg").write_text("no")
    with pytest.raises(DataError, match=r"no image in .* can be read \(2 tried\)"):
        open_split(ds_root, "val")


# --- the commands: reports at the end, --strict ------------------------------------

@pytest.fixture(scope="module")
def ckpt4(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "four.safetensors", num_classes=4)


def test_finetune_with_workers_survives_and_reports(messy, ckpt4, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", str(ckpt4), "--data", str(messy["root"]), "--out", str(out),
            "--img-size", "32", "--batch-size", "2", "--workers", "2", "--epochs", "2",
            "--stage", "gates", "--json"]  # 22 images / 2: every epoch meets every file
    assert cli_run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    data = doc["data"]
    # 2 found by the scan, 4 by the decoder, 1 in the val split
    assert data["bad_files"] == 7 and len(data["first_bad"]) == 5
    assert messy["scan_bad"] <= {Path(b["path"]).name for b in data["first_bad"]}
    assert data["ignored_files"] == 3 and data["empty_classes"] == ["c_empty"]
    assert doc["epochs"] == 2


def test_finetune_prints_the_report_on_stderr(messy, ckpt4, tmp_path, capsys):
    args = ["finetune", str(ckpt4), "--data", str(messy["root"]), "--out", str(tmp_path / "r"),
            "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
            "--stage", "gates"]
    assert cli_run(args) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long warnings
    assert "unreadable image file(s) skipped" in err and "gone.png (broken symlink)" in err
    assert "3 file(s) ignored" in err and "c_empty" in err and "Traceback" not in err


def test_strict_stops_at_once_naming_the_file(messy, ckpt4, tmp_path, capsys):
    args = ["finetune", str(ckpt4), "--data", str(messy["root"]), "--out", str(tmp_path / "r"),
            "--img-size", "32", "--batch-size", "4", "--workers", "0", "--stage", "gates", "--strict"]
    assert cli_run(args) == 2
    err = _the_error_line(capsys.readouterr().err)
    assert "gone.png: broken symlink" in err and "--strict" in err
    assert not (tmp_path / "r" / "state.pt").exists()


def test_eval_reports_skipped_files_and_strict_names_a_decode_failure(messy, ckpt4, capsys):
    base = ["eval", str(ckpt4), "--data", str(messy["root"]), "--workers", "2", "--img-size", "32"]
    assert cli_run([*base, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 3 and doc["data"]["bad_files"] == 1
    assert doc["data"]["first_bad"][0]["reason"] == "empty file (0 bytes)"
    assert [c["images"] for c in doc["per_class"]] == [1, 1, 0, 1]  # c_empty keeps its row
    assert cli_run(base) == 0
    assert "1 unreadable image file(s) skipped" in " ".join(capsys.readouterr().err.split())
    assert cli_run([*base, "--strict"]) == 2  # found only by decoding it
    err = _the_error_line(capsys.readouterr().err)
    assert "zero.png: empty file (0 bytes)" in err


def _the_error_line(stderr: str) -> str:
    """A user error is exactly one ``error:`` line; the empty class folder's warning
    may come before it, and nothing else (no traceback)."""
    lines = stderr.splitlines()
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, stderr
    assert all(l.startswith(("error:", "warning:")) for l in lines), stderr
    assert lines[-1] == errors[0]
    return errors[0]


def test_report_lines_name_the_first_few():
    report = DataReport(bad={f"/d/{i}.png": "truncated image" for i in range(8)})
    (line,) = report_lines(report.to_dict())
    assert line.startswith("8 unreadable image file(s) skipped (--strict stops instead)")
    assert "/d/4.png (truncated image)" in line and "/d/5.png" not in line and "and 3 more" in line
    assert report_lines(DataReport().to_dict()) == []


# --- symlinks never relabel or repeat images -----------------------------------------------

def test_links_never_relabel_or_repeat_images(tmp_path):
    root, store = tmp_path / "d", tmp_path / "store"
    a, b = root / "train" / "a", root / "train" / "b"
    for folder, prefix in ((a, "a"), (b, "b")):
        folder.mkdir(parents=True)
        for i in range(2):
            good_png(folder / f"{prefix}{i}.png", i)
    (a / "sub").mkdir()
    good_png(a / "sub" / "s.png", 5)
    store.mkdir()
    good_png(store / "o.png", 6)
    links = {"up": "..", "self": ".", "loop": "loop", "to_b": "../b", "b0.png": "../b/b0.png",
             "again.png": "a0.png", "alias": "sub", "far": str(store)}
    for name, target in links.items():
        (a / name).symlink_to(target)
    (a / "o.png").symlink_to(store / "o.png")  # one image out of the data folder: an image store
    (a / "loop.png").symlink_to("loop.png")    # ELOOP, named like an image
    ds = open_split(root, "train")
    labels = {str(Path(p).relative_to(root / "train")): t for p, t in ds.samples}
    assert labels == {"a/a0.png": 0, "a/a1.png": 0, "a/o.png": 0, "a/sub/s.png": 0,
                      "b/b0.png": 1, "b/b1.png": 1}
    skipped = {str(Path(p).relative_to(a)): r for p, r in ds.report.links.items()}
    assert set(skipped) == {"up", "self", "loop", "to_b", "b0.png", "again.png", "alias/s.png", "far"}
    assert "which contains it" in skipped["up"] and "which contains it" in skipped["self"]
    assert skipped["loop"] == "a symlink loop"
    assert "of class 'b'" in skipped["to_b"] and "of class 'b'" in skipped["b0.png"]
    assert skipped["again.png"].startswith("the same file as") and "out of the data folder" in skipped["far"]
    assert ds.report.bad == {str(a / "loop.png"): "a symlink loop"}
    (line,) = [l for l in report_lines(ds.report.to_dict()) if "symlink" in l and "followed" in l]
    assert line.startswith("8 symlink(s) not followed:")


@pytest.mark.parametrize("target, says", [("b", "links to the folder of class 'b'"),
                                          ("..", "a folder above it")])
def test_a_class_folder_that_links_to_another_class_is_an_error(tmp_path, target, says):
    root = tmp_path / "d"
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        good_png(root / "train" / name / "x.png", 0)
    (root / "train" / "c").symlink_to(target)
    with pytest.raises(DataError, match=says):
        open_split(root, "train")


def test_an_ancestor_link_neither_crashes_eval_nor_adds_a_sample(tmp_path, capsys):
    root = tmp_path / "d"
    for name in ("a", "b"):
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            good_png(root / "val" / name / f"{i}.png", i)
    (root / "val" / "a" / "up").symlink_to("..")
    (root / "val" / "a" / "self.png").symlink_to("self.png")
    ckpt = make_checkpoint(tmp_path / "two.safetensors", num_classes=2)
    assert cli_run(["eval", str(ckpt), "--data", str(root), "--workers", "0", "--img-size", "32",
                    "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 4 and doc["data"]["skipped_links"] == 1 and doc["data"]["bad_files"] == 1


# --- many bad files: remembered, replaced at random within the class, warned about ----------

def test_many_bad_files_spread_over_their_class_and_warn(tmp_path, caplog):
    import time
    from collections import Counter

    root = tmp_path / "d"
    a, b = root / "train" / "a", root / "train" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for i in range(1000):
        (a / f"bad{i:04d}.png").write_bytes(b"")
    for i in range(8):
        good_png(a / f"good{i}.png", i, size=8)
        good_png(b / f"b{i}.png", 10 + i, size=8)
    with caplog.at_level("WARNING"):
        ds = open_split(root, "train")
    assert caplog.text.count("class a: ") == 1  # warned once, when the split was opened
    bad = [i for i, (p, _) in enumerate(ds.samples) if Path(p).name.startswith("bad")]
    ds.seed = 5
    picks = Counter(ds.pick(i) for i in bad)
    # Spread over the 8 readable images of the class (1000 / 8 = 125 each on average);
    # "the next readable one" would have drawn one image about a thousand times.
    assert len(picks) == 8 and max(picks.values()) < 300
    assert all(Path(ds.samples[j][0]).name.startswith("good") for j in picks)
    fresh = open_split(root, "train")  # what a resumed process knows
    fresh.seed = 5
    assert all(fresh.pick(i) == ds.pick(i) for i in bad[::97])
    assert ds.report.bad_share == {"a": [1000, 1008]}
    assert any("class a: 1000 of 1008 file(s) (99%) are unreadable" in line for line in report_lines(ds.report.to_dict()))

    loader = make_loader(open_split(root, "train", transform=tensor_transform(8)), 16,
                         training=True, seed=5)
    for epoch in range(2):
        started = time.perf_counter()
        start_epoch(loader, epoch)
        assert sum(len(y) for _, y in loader) == 1008  # 1016 // 16 batches, none short
        seconds = time.perf_counter() - started
    assert seconds < 5  # no bad file is decoded again


def test_a_resumed_run_replaces_bad_files_exactly_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """The replacement of a bad sample depends on (seed, epoch, index) only: a run stopped
    mid-epoch and resumed in a new process ends with the very weights of an
    uninterrupted run."""
    from safetensors.torch import load_file

    from fixtures.runs import write_folder

    data = write_folder(tmp_path / "data")
    for i, cls in enumerate(sorted((data / "train").iterdir())[:2]):
        (cls / f"zz_empty{i}.png").write_bytes(b"")
        (cls / f"zz_cut{i}.png").write_bytes(encoded("png")[:300])
    ckpt = make_checkpoint(tmp_path / "g.safetensors", num_classes=3)
    args = ["--data", str(data), "--img-size", "32", "--batch-size", "7", "--workers", "0",
            "--epochs", "1", "--lr", "0.02", "--seed", "3"]
    assert cli_run(["finetune", str(ckpt), "--out", str(tmp_path / "ref"), *args]) == 0
    monkeypatch.setenv("GCT_SURGERY_FAULT", "term:after_step:5")  # the full stage's 2nd step
    assert cli_run(["finetune", str(ckpt), "--out", str(tmp_path / "cut"), *args]) == 143
    monkeypatch.delenv("GCT_SURGERY_FAULT")
    assert cli_run(["finetune", "--resume", str(tmp_path / "cut")]) == 0
    ref, cut = load_file(tmp_path / "ref" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref)
