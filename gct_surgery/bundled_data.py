"""The small Fashion-MNIST subset that ships inside the package, for offline demos.

``data/fashion_mnist_subset.npz`` holds 300 train and 100 val images per class
(see ``data/README.md`` for source, licence and selection rule). NumPy and Pillow
are imported inside the functions so that importing this module stays free.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DataError

BUNDLED_DATA_PATH = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"

SPLITS = ("train", "val")
_MARKER = ".complete"


def load_bundled() -> dict:
    """Return the bundled arrays: train/val images (uint8 N×28×28), labels, class_names.

    Loaded with ``allow_pickle=False``: the file is data, never code.
    """
    import numpy as np

    if not BUNDLED_DATA_PATH.is_file():
        raise DataError(f"bundled data file is missing: {BUNDLED_DATA_PATH} "
                        "(reinstall gct-surgery, or run scripts/make_bundled_data.py)")
    with np.load(BUNDLED_DATA_PATH, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def class_folder_names(class_names) -> list[str]:
    """Folder name per label, e.g. ``0_t-shirt_top``.

    The label prefix (zero-padded) makes the alphabetical order that ImageFolder
    uses equal the label order, so ``class_to_idx`` matches the original labels.
    """
    width = len(str(len(class_names) - 1))
    return [
        f"{label:0{width}d}_" + str(name).lower().replace("/", "_").replace(" ", "_")
        for label, name in enumerate(class_names)
    ]


def write_image_folder(out_dir, *, size=None, per_class=None) -> Path:
    """Write the bundled set as ``out_dir/{train,val}/<label>_<class>/<index>.png``.

    This is the layout torchvision's ``ImageFolder`` (and the training code) reads.
    ``size`` (an int or ``(width, height)``) upsamples the 28×28 grayscale images
    with bilinear resampling; ``None`` keeps them at 28×28. ``per_class``
    (``(train, val)`` counts, or one int for both) writes the first images of each
    class only, a smaller set for quick runs; ``None`` writes all of them.

    Idempotent and safe to interrupt or race: the tree is built in a temp folder
    beside ``out_dir``, the ``.complete`` marker is written last, and the folder is
    renamed into place in one step. If ``out_dir`` already holds a complete tree it
    is returned at once (a tree written with another ``size`` raises ``DataError``).
    A non-empty ``out_dir`` without the marker is never touched: it raises.
    """
    out_dir = Path(out_dir)
    size = _normalise_size(size)
    per_class = _normalise_counts(per_class)
    if _is_complete(out_dir, size, per_class):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a complete bundled image folder; "
                        "remove it or choose another output folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        counts = _write_tree(tmp, size, per_class)
        (tmp / _MARKER).write_text(json.dumps({"size": size, "per_class": per_class, **counts})
                                   + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
        try:
            os.replace(tmp, out_dir)  # also replaces an empty out_dir
        except OSError:
            # Someone else finished first: use theirs if it is complete.
            if not _is_complete(out_dir, size, per_class):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out_dir


def _normalise_size(size):
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise DataError(f"image size must be positive, got {size!r}")
    return [width, height]


def _normalise_counts(per_class):
    if per_class is None:
        return None
    counts = [per_class, per_class] if isinstance(per_class, int) else [int(v) for v in per_class]
    if len(counts) != len(SPLITS) or min(counts) < 1:
        raise DataError(f"per_class must be a positive count or (train, val) counts, "
                        f"got {per_class!r}")
    return counts


def _is_complete(out_dir: Path, size, per_class=None) -> bool:
    """True if ``out_dir`` carries our marker; a marker for another size or subset is an
    error."""
    marker = out_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        doc = json.loads(marker.read_text())
        written, subset = doc.get("size"), doc.get("per_class")
    except (OSError, ValueError, AttributeError):
        return False
    if written != size:
        raise DataError(f"{out_dir} already holds the bundled images at size {written}, "
                        f"not {size}; remove it or choose another output folder")
    if subset != per_class:
        def what(c):
            return "all the images" if c is None else f"{c[0]} train and {c[1]} val images a class"
        raise DataError(f"{out_dir} already holds {what(subset)} of the bundled set, not "
                        f"{what(per_class)}; remove it or choose another output folder")
    return True


def _write_tree(root: Path, size, per_class=None) -> dict:
    import numpy as np
    from PIL import Image

    data = load_bundled()
    folders = class_folder_names(data["class_names"])
    counts = {}
    for s, split in enumerate(SPLITS):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if per_class is not None:  # the first images of each class, in file order
            rank = np.zeros(len(labels), dtype=int)  # each image's place within its class
            for label in np.unique(labels):
                rank[labels == label] = np.arange(int((labels == label).sum()))
            images, labels = images[rank < per_class[s]], labels[rank < per_class[s]]
        for folder in folders:
            (root / split / folder).mkdir(parents=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            picture = Image.fromarray(image)  # uint8 H×W -> mode "L"
            if size is not None:
                picture = picture.resize(tuple(size), Image.Resampling.BILINEAR)
            picture.save(root / split / folders[int(label)] / f"{index:05d}.png")
        counts[split] = int(len(labels))
    return counts
