#!/usr/bin/env python3
"""Build ``gct_surgery/data/fashion_mnist_subset.npz``: a small, balanced, real image set.

Why
    The offline demo needs a real labelled image dataset that ships inside the
    package (no network at demo time). The full Fashion-MNIST is ~30 MB; this
    subset is ~2-3 MB and still has every class.

Source
    Fashion-MNIST by Zalando Research (MIT licence), as packaged by Debian in
    ``dataset-fashion-mnist`` (install: ``apt-get install dataset-fashion-mnist``).
    The four gzipped IDX files live in ``/usr/share/datasets/fashion-mnist``; the
    script finds that folder with ``dpkg -L dataset-fashion-mnist`` and falls back to
    that fixed path. ``--source DIR`` points it at any folder holding the four files
    (``train-images-idx3-ubyte.gz`` etc., gzipped or not).

Selection rule (deterministic, seeded)
    * train: 300 images of each of the 10 classes, from the Fashion-MNIST *train*
      split (60,000 images) -> 3,000 images;
    * val: 100 images of each class, from the Fashion-MNIST *test* split
      (10,000 images) -> 1,000 images.
    Within a split and class, every candidate index ``i`` gets the key
    ``sha256(f"{seed}:{split}:{i}")`` and the ``n`` indices with the smallest keys
    are kept. The kept indices of all classes are then sorted by their original
    position, so the classes stay interleaved as in the source. A keyed hash is
    used instead of a NumPy random generator because its output can never change
    with the NumPy version. The default seed is 0.

Output
    ``np.savez_compressed`` arrays: ``train_images`` (uint8, N x 28 x 28),
    ``train_labels`` (uint8), ``val_images``, ``val_labels``, ``class_names`` (a
    NumPy unicode array, so ``np.load(..., allow_pickle=False)`` works). The zip
    members' timestamps are then pinned to 1980-01-01 so that a rerun yields the
    same bytes (same sha256) for the same zlib; the file is written atomically.

Rerun
    python scripts/make_bundled_data.py                 # defaults
    python scripts/make_bundled_data.py --source DIR --seed 0 --out PATH

    After a rerun, update the sha256 in ``gct_surgery/data/README.md``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "dataset-fashion-mnist"
FALLBACK_SOURCE = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "gct_surgery" / "data" / "fashion_mnist_subset.npz"
MAX_BYTES = 5 * 1024 * 1024

# The official label order, from the Fashion-MNIST README.
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = {
    # name in the npz: (IDX file prefix, images per class)
    "train": ("train", 300),
    "val": ("t10k", 100),
}
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def discover_source() -> Path:
    """Folder of the IDX files, as installed by the Debian package."""
    try:
        out = subprocess.run(
            ["dpkg", "-L", PACKAGE], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return FALLBACK_SOURCE
    for line in out.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz"):
            return Path(line).parent
    return FALLBACK_SOURCE


def _open_idx(folder: Path, stem: str) -> bytes:
    for name, opener in ((f"{stem}.gz", gzip.open), (stem, open)):
        path = folder / name
        if path.is_file():
            with opener(path, "rb") as f:
                return f.read()
    raise FileNotFoundError(f"neither {stem}.gz nor {stem} in {folder}")


def read_idx(folder: Path, stem: str) -> np.ndarray:
    """Parse an IDX file (big-endian header: 0x0000, dtype code, ndim, dims)."""
    data = _open_idx(folder, stem)
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{stem}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{stem}: header says {dims}, payload has {array.size} bytes")
    return array.reshape(dims)


def select(labels: np.ndarray, per_class: int, split: str, seed: int) -> np.ndarray:
    """Indices of ``per_class`` items of every class, chosen by the keyed hash."""
    chosen = []
    for label in range(len(CLASS_NAMES)):
        candidates = np.flatnonzero(labels == label)
        if candidates.size < per_class:
            raise ValueError(f"{split}: class {label} has only {candidates.size} images")
        keys = sorted(
            (hashlib.sha256(f"{seed}:{split}:{i}".encode()).digest(), int(i))
            for i in candidates
        )
        chosen.extend(i for _, i in keys[:per_class])
    return np.array(sorted(chosen), dtype=np.int64)


def pin_zip_timestamps(npz_bytes: bytes) -> bytes:
    """Rewrite the npz zip with fixed member timestamps, so reruns are byte-identical."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(npz_bytes)) as src, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            with dst.open(member, "w", force_zip64=True) as f:
                f.write(src.read(info.filename))
    return out.getvalue()


def build(source: Path, seed: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for split, (prefix, per_class) in SPLITS.items():
        images = read_idx(source, f"{prefix}-images-idx3-ubyte")
        labels = read_idx(source, f"{prefix}-labels-idx1-ubyte")
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"{prefix}: unexpected shapes {images.shape}, {labels.shape}")
        idx = select(labels, per_class, split, seed)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[idx], dtype=np.uint8)
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[idx], dtype=np.uint8)
    arrays["class_names"] = np.array(CLASS_NAMES, dtype=np.str_)
    return arrays


def write(arrays: dict[str, np.ndarray], out: Path) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = pin_zip_timestamps(buf.getvalue())
    if len(data) > MAX_BYTES:
        raise SystemExit(f"refusing to write {len(data)} bytes (> {MAX_BYTES})")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None,
                        help=f"folder with the Fashion-MNIST IDX files "
                             f"(default: found via `dpkg -L {PACKAGE}`)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output npz (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--seed", type=int, default=0, help="selection seed (default: 0)")
    args = parser.parse_args(argv)

    source = args.source or discover_source()
    arrays = build(source, args.seed)
    data = write(arrays, args.out)

    print(f"source: {source}")
    print(f"wrote {args.out}: {len(data):,} bytes ({len(data) / 2**20:.2f} MiB)")
    print(f"sha256: {hashlib.sha256(data).hexdigest()}")
    for split in SPLITS:
        counts = np.bincount(arrays[f"{split}_labels"], minlength=len(CLASS_NAMES))
        print(f"{split}: {len(arrays[f'{split}_labels'])} images")
        for label, (name, count) in enumerate(zip(CLASS_NAMES, counts)):
            print(f"  {label} {name:<12} {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
