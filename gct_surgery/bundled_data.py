"""The small Fashion-MNIST subset that ships inside the package, for offline demos.

``data/fashion_mnist_subset.npz`` holds 300 train and 100 val images per class
(see ``data/README.md`` for source, licence and selection rule). NumPy and Pillow
are imported inside the functions so that importing this module stays free.
"""
from __future__ import annotations

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
    size = [size, size] if isinstance(size, int) else size and [int(v) for v in size]
    per_class = [per_class] * 2 if isinstance(per_class, int) else per_class and list(per_class)
    if _is_complete(out_dir, size, per_class):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a complete bundled image folder; "
                        "remove it or choose another output folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_tree(tmp, size, per_class)
        (tmp / _MARKER).write_text(json.dumps({"size": size, "per_class": per_class}) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
        os.replace(tmp, out_dir)  # also replaces an empty out_dir
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # os.replace fails when someone else finished first: use theirs if it is complete
        if not isinstance(e, OSError) or not _is_complete(out_dir, size, per_class):
            raise
    return out_dir


def _is_complete(out_dir: Path, size, per_class=None) -> bool:
    """True if ``out_dir`` carries our marker; a marker for another size or subset is an
    error (a mixed tree would silently train on both)."""
    try:
        doc = json.loads((out_dir / _MARKER).read_text())
        written = (doc.get("size"), doc.get("per_class"))
    except (OSError, ValueError, AttributeError):
        return False
    if written != (size, per_class):  # size and per_class as (given, written)
        raise DataError(f"{out_dir} already holds the bundled set written with size, per_class "
                        f"{written}, not {(size, per_class)}; remove it or choose another "
                        "output folder")
    return True


def _write_tree(root: Path, size, per_class=None) -> None:
    from collections import Counter

    from PIL import Image

    data = load_bundled()
    folders = class_folder_names(data["class_names"])
    for s, split in enumerate(SPLITS):
        for folder in folders:
            (root / split / folder).mkdir(parents=True)
        seen = Counter()  # the first images of each class, in file order
        for image, label in zip(data[f"{split}_images"], data[f"{split}_labels"]):
            if per_class is not None and seen[int(label)] >= per_class[s]:
                continue
            picture = Image.fromarray(image)  # uint8 H×W -> mode "L"
            if size is not None:
                picture = picture.resize(tuple(size), Image.Resampling.BILINEAR)
            picture.save(root / split / folders[int(label)] / f"{sum(seen.values()):05d}.png")
            seen[int(label)] += 1
