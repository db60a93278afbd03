"""The bundled Fashion-MNIST subset: present, small, balanced, and usable as an ImageFolder."""
from __future__ import annotations

import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from gct_surgery import bundled_data
from gct_surgery.bundled_data import BUNDLED_DATA_PATH, load_bundled, write_image_folder
from gct_surgery.errors import DataError

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
EXPECTED_FOLDERS = [
    "0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
]
PER_CLASS = {"train": 300, "val": 100}


def _pngs(root):
    return sorted(root.rglob("*.png"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One written tree shared by the folder tests (writing 4,000 PNGs takes a second or two)."""
    return write_image_folder(tmp_path_factory.mktemp("bundled") / "fmnist")


def test_npz_exists_and_is_small():
    assert BUNDLED_DATA_PATH.is_file()
    assert BUNDLED_DATA_PATH.stat().st_size <= 5 * 1024 * 1024


def test_npz_holds_only_plain_arrays():
    with np.load(BUNDLED_DATA_PATH, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(
            ["train_images", "train_labels", "val_images", "val_labels", "class_names"])
    with zipfile.ZipFile(BUNDLED_DATA_PATH) as zf:
        assert zf.testzip() is None


def test_load_bundled_balanced_uint8_28x28():
    data = load_bundled()
    assert data["class_names"].dtype.kind == "U"
    assert data["class_names"].tolist() == CLASS_NAMES
    for split, per_class in PER_CLASS.items():
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        assert images.dtype == np.uint8 and labels.dtype == np.uint8
        assert images.shape == (10 * per_class, 28, 28)
        assert labels.shape == (10 * per_class,)
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert labels.max() == 9
        # Real pictures: not constant, not all the same, not mostly duplicates.
        assert images.min() == 0 and images.max() == 255
        assert len({img.tobytes() for img in images}) > 0.99 * len(images)
    # Train and val come from different Fashion-MNIST splits: no shared image.
    train = {img.tobytes() for img in data["train_images"]}
    assert not train & {img.tobytes() for img in data["val_images"]}


def test_class_folder_names_sort_in_label_order():
    names = bundled_data.class_folder_names(CLASS_NAMES)
    assert names == EXPECTED_FOLDERS
    assert sorted(names) == names


def test_module_import_is_light():
    code = ("import sys, gct_surgery.bundled_data; "
            "bad = {'torch', 'timm', 'numpy', 'PIL'} & set(sys.modules); "
            "sys.exit(f'imported {sorted(bad)}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_write_image_folder_writes_real_pngs(folder):
    from PIL import Image

    data = load_bundled()
    assert (folder / ".complete").is_file()
    for split, per_class in PER_CLASS.items():
        split_dir = folder / split
        assert sorted(p.name for p in split_dir.iterdir()) == EXPECTED_FOLDERS
        for label, name in enumerate(EXPECTED_FOLDERS):
            assert len(list((split_dir / name).glob("*.png"))) == per_class
        files = _pngs(split_dir)
        assert len(files) == 10 * per_class
        for path in files[:: 97]:
            with Image.open(path) as im:
                assert im.format == "PNG"
                assert im.size == (28, 28)
                pixels = np.asarray(im)
            index = int(path.stem)
            label = EXPECTED_FOLDERS.index(path.parent.name)
            assert data[f"{split}_labels"][index] == label
            np.testing.assert_array_equal(pixels, data[f"{split}_images"][index])
    assert len(_pngs(folder)) == 4000
    assert not list(folder.parent.glob(".fmnist.*"))  # no temp folder left behind


def test_imagefolder_reads_it_in_label_order(folder):
    from torchvision.datasets import ImageFolder

    for split, per_class in PER_CLASS.items():
        ds = ImageFolder(folder / split)
        assert ds.classes == EXPECTED_FOLDERS
        assert ds.class_to_idx == {name: i for i, name in enumerate(EXPECTED_FOLDERS)}
        assert len(ds) == 10 * per_class
        image, target = ds[0]
        assert image.size == (28, 28)
        assert 0 <= target < 10


def test_second_call_is_a_fast_noop(folder):
    before = {p: p.stat().st_mtime_ns for p in _pngs(folder)}
    start = time.perf_counter()
    assert write_image_folder(folder) == folder
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in _pngs(folder)} == before


def test_size_upsamples(tmp_path):
    from PIL import Image

    out = write_image_folder(tmp_path / "big", size=64)
    path = next((out / "val" / "3_dress").glob("*.png"))
    with Image.open(path) as im:
        assert im.size == (64, 64) and im.mode == "L"
    # The same folder at another size would silently mix sizes: refuse.
    with pytest.raises(DataError):
        write_image_folder(out, size=32)
    with pytest.raises(DataError):
        write_image_folder(out)


def test_refuses_a_foreign_nonempty_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DataError):
        write_image_folder(out)
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_fills_an_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert write_image_folder(out) == out
    assert len(_pngs(out)) == 4000
