"""Image-classification folders: reading one image, the dataset over a split, and
replacing the files that cannot be read.

The layout is the one timm and torchvision read::

    DIR/train/<class>/**/*.png|jpg|...
    DIR/val/<class>/**/*          (or DIR/validation/<class>/**/*)

Scanning a split (labels by folder name, what else the folder holds, symlinks that
never relabel or repeat data) is ``scan.py``; the report is ``data_report.py``.

Broken data never stops a run (see docs/reliability.md):

- a file that is not an image by name (``.DS_Store``, ``notes.txt``) or hidden is
  ignored, counted and reported;
- an image file that cannot be read (zero bytes, truncated, not an image, no
  permission, a broken symlink, a pipe) is remembered after its first failure and, in
  training, replaced by a readable image of the *same class* drawn at random from a
  seed, the epoch and the index (so a resumed run sees the same batches); a class
  with many bad files is warned about; ``strict=True`` fails instead, naming the file;
- images of every mode become RGB correctly (``to_rgb``): 16-bit grey is scaled,
  not clipped; transparency is composited over white; CMYK is converted.

Batching these samples, and carrying the count home from worker processes, is
``loaders``' job.
"""
from __future__ import annotations

import bisect
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator

from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.reader import Reader

from ..errors import DataError
from .data_report import BAD_SHARE, FIRST_FEW, DataReport, bad_share_line, report_lines  # noqa: F401
from .scan import (IMAGE_EXTENSIONS, SPLIT_FOLDERS, class_folders, fingerprint,  # noqa: F401
                   scan_split, split_dir)

_logger = logging.getLogger(__name__)

RANDOM_DRAWS = 16  # random draws from the class before walking it for a readable image


class BadImageError(DataError):
    """An image file cannot be read (raised under ``strict`` only; else it is skipped)."""


# --- reading one image ---------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, correctly.

    PIL's own ``convert("RGB")`` clips 16-bit grey to 255 (a white image) and drops
    alpha, exposing whatever colour transparent pixels happen to store. Here 16-bit
    values are scaled (v / 257, so 65535 -> 255), transparency (RGBA, LA, palette with
    a transparent index) is composited over white, and CMYK, palette, grey and
    bilevel images go through PIL's conversions (an Adobe CMYK JPEG is un-inverted by
    PIL's decoder).
    """
    import numpy as np

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0                      # float images in [0, 1]
        elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0                      # 16-bit range onto 8 bits
        img = Image.fromarray(np.clip(np.nan_to_num(a).round(), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def read_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open, fully decode and convert one file (the file is closed on return): RGB, or
    grey ("L") for a model whose input has one channel (colour images converted)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now: a truncated file fails here, not inside a transform
        img = to_rgb(img)
        return img.convert("L") if channels == 1 else img


def describe_failure(path: str | os.PathLike, error: BaseException) -> str:
    """A short reason a file could not be read, for the report."""
    from PIL import UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "missing (a broken symlink?)"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can read"
    text = " ".join(str(error).split())[:120]
    if "truncated" in text.lower():
        return "truncated image"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Samples(Reader):
    """A timm reader over a ready list of (path, label)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]]) -> None:
        super().__init__()
        self.root = str(root)
        self.samples = samples

    def __getitem__(self, index: int):
        # A path, not an open file: PIL opens it and closes it once decoded. (Our
        # dataset reads through ``read_image``; this serves timm's own __getitem__.)
        return self.samples[index]

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        name = self.samples[index][0]
        return os.path.basename(name) if basename else name if absolute else os.path.relpath(name, self.root)


class ImageFolderDataset(ImageDataset):
    """timm's ImageDataset over ``split/<class>/**``, with labels by folder name, the
    scan's ``report``, and bad files replaced by readable images of the same class.

    ``load(i)`` returns ``((image, target), skipped, found)``: ``skipped`` is the
    ``(path, reason, label)`` of sample ``i`` itself when it is bad (a skipped sample),
    ``found`` the bad files newly met while looking for its replacement. A worker
    process sends both to the main process with the batch. ``dataset[i]`` returns the
    sample alone and counts into ``report`` (single process use).
    """

    def __init__(self, folder: Path, class_to_idx: dict[str, int], *, transform=None,
                 scanned: tuple[list[tuple[str, int]], DataReport] | None = None,
                 channels: int = 3) -> None:
        # ``scanned``: samples and report already found (a CSV split, a held-out share;
        # see layouts.py), paths relative to ``folder`` in the fingerprint.
        samples, report = scanned if scanned is not None else scan_split(folder, class_to_idx)
        super().__init__(str(folder), reader=_Samples(folder, samples), transform=transform)
        self.channels = channels
        self._class_to_idx = dict(class_to_idx)
        self.report = report
        self._bad: dict[int, str] = {}  # this process's memo of bad indices
        self._by_class: dict[int, list[int]] | None = None
        self._orders: dict[int, tuple] = {}  # per class (and -1: the split), see _order
        self._fingerprint: str | None = None

    @property
    def class_to_idx(self) -> dict[str, int]:
        return dict(self._class_to_idx)

    @property
    def classes(self) -> list[str]:
        return [c for c, _ in sorted(self._class_to_idx.items(), key=lambda kv: kv[1])]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.reader.samples]

    def fingerprint(self) -> str:
        """The split's (relative path, label) pairs, hashed (``scan.fingerprint``)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.reader.samples, self.reader.root)
        return self._fingerprint

    def by_class(self) -> dict[int, list[int]]:
        """Sample indices per label (built once, before workers are forked)."""
        if self._by_class is None:
            self._by_class = {}
            for i, (_, target) in enumerate(self.reader.samples):
                self._by_class.setdefault(target, []).append(i)
        return self._by_class

    def remember(self, bad: dict[str, str]) -> None:
        """Known bad files (``DataReport.bad``): never decoded again by this process or
        the workers forked (or spawned) from it after this call."""
        for i, (path, _) in enumerate(self.reader.samples):
            reason = bad.get(path)
            if reason is not None:
                self._bad[i] = reason

    def bad_per_class(self) -> dict[int, int]:
        """How many samples of each label are known to be bad."""
        counts: dict[int, int] = {}
        for i in self._bad:
            label = self.reader.samples[i][1]
            counts[label] = counts.get(label, 0) + 1
        return counts

    def _read(self, i: int) -> tuple[Any, str | None, bool]:
        """``(sample, None, _)`` or ``(None, reason, newly_found)``."""
        reason = self._bad.get(i)
        if reason is not None:
            return None, reason, False
        path, target = self.reader.samples[i]
        try:
            img = read_image(path, self.channels)
        except Exception as e:  # any decoder failure is the file's, not the run's
            self._bad[i] = describe_failure(path, e)
            return None, self._bad[i], True
        return (self.transform(img) if self.transform is not None else img, target), None, False

    def load(self, index: int, *, replace: bool = True, epoch: int = 0, seed: int = 0):
        """The sample at ``index`` or (``replace``) a readable one of its class, chosen
        from ``(seed, epoch, index)`` only: the same in every process and after a resume.
        ``(None, skipped, found)`` when it is bad and ``replace`` is off, or when no file
        of the split can be read."""
        sample, reason, _ = self._read(index)
        if reason is None:
            return sample, [], []
        path, target = self.reader.samples[index]
        skipped, found = [(path, reason, target)], []
        if not replace:
            return None, skipped, found
        for j in self._candidates(index, epoch, seed):
            sample, reason, new = self._read(j)
            if reason is None:
                return sample, skipped, found
            if new:
                found.append((self.reader.samples[j][0], reason, self.reader.samples[j][1]))
        return None, skipped, found

    def _candidates(self, index: int, epoch: int, seed: int) -> Iterator[int]:
        """Random draws from the class of ``index``, then the whole class, then the whole
        split, each in this epoch's seeded order from a random point: the first readable
        one replaces ``index``. Which one that is depends only on ``(seed, epoch, index)``
        and on which files are readable, never on what this process knows yet."""
        rng = random.Random(f"{seed}:{epoch}:{index}")
        label = self.reader.samples[index][1]
        same = self.by_class()[label]
        for _ in range(min(RANDOM_DRAWS, len(same))):
            yield same[rng.randrange(len(same))]
        everything = range(len(self.reader.samples))
        for key, seq in ((label, same), (-1, everything)):
            start, stride, steps = self._order(key, seq, epoch, seed)
            yield from _from(seq, start, stride, steps, rng.randrange(len(seq)))

    def _order(self, key: int, seq, epoch: int, seed: int) -> tuple[int, int, list[int]]:
        """This epoch's visiting order of ``seq`` (a seeded start and a stride coprime to
        its length: item ``p`` comes at step ``(p - start) / stride`` mod n), and the
        sorted steps of the items not known to be bad. Known-bad items are skipped
        because they would fail anyway, so a stale list (the memo only grows) gives the
        same answer; it is rebuilt when the memo has grown by a tenth."""
        cached = self._orders.get(key)
        if cached is None or cached[0] != (seed, epoch) or len(self._bad) > cached[1] * 1.1 + 16:
            n = len(seq)
            rng = random.Random(f"{seed}:{epoch}:order:{key}")
            start, stride = rng.randrange(n), 1
            if n > 2:
                stride = rng.randrange(1, n)
                while math.gcd(stride, n) != 1:
                    stride = stride % (n - 1) + 1
            inverse = pow(stride, -1, n)
            steps = sorted((p - start) * inverse % n for p, i in enumerate(seq) if i not in self._bad)
            cached = self._orders[key] = ((seed, epoch), len(self._bad), start, stride, steps)
        return cached[2], cached[3], cached[4]

    def __getitem__(self, index: int):
        sample, skipped, found = self.load(index)
        self.report.add_skipped([(p, r) for p, r, _ in skipped])
        self.report.add_bad([(p, r) for p, r, _ in found])
        if sample is None:
            raise no_readable_image(self.reader.root, [(p, r) for p, r, _ in skipped + found])
        return sample


def _from(seq, start: int, stride: int, steps: list[int], offset: int) -> Iterator[int]:
    """The items of ``seq`` whose steps are in ``steps``, in visiting order from step
    ``offset`` on, round to the start: a binary search, not a walk past bad files."""
    first = bisect.bisect_left(steps, offset)
    for j in range(len(steps)):
        yield seq[(start + steps[(first + j) % len(steps)] * stride) % len(seq)]


def no_readable_image(folder: str, skipped: list[tuple[str, str]]) -> DataError:
    path, reason = skipped[0] if skipped else (folder, "empty")
    return DataError(f"no image in {folder} can be read ({len(skipped)} tried), e.g. {path}: {reason}")


def open_split(root: str | Path, split: str, *, transform=None,
               class_to_idx: dict[str, int] | None = None, strict: bool = False,
               channels: int = 3) -> ImageFolderDataset:
    """One split as a dataset. ``class_to_idx`` (from the train split) keeps labels
    consistent across splits; a class folder it does not know is an error. Without it,
    labels follow the folder names, empty folders included (and reported)."""
    folder = split_dir(root, split)
    classes = class_folders(folder)
    if not classes:
        raise DataError(f"{folder} has no class folders: put images in {folder}/<class>/")
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(f"{folder} has classes the train split lacks: {', '.join(unknown[:5])}")
    dataset = ImageFolderDataset(folder, class_to_idx or {c: i for i, c in enumerate(classes)},
                                 transform=transform, channels=channels)
    if len(dataset) == 0:
        raise DataError(f"{folder} holds no images: {len(classes)} class folder(s), none with a "
                        f"file ending in {', '.join(IMAGE_EXTENSIONS)}")
    report = dataset.report
    for name in report.empty_classes:
        _logger.warning("%s/%s holds no images; it keeps label %d", folder, name,
                        dataset.class_to_idx[name])
    if strict:
        check_strict(report)
    return dataset


def check_strict(report: DataReport) -> None:
    """Under ``--strict``: fail at the first bad file already known."""
    if report.bad:
        raise strict_error(*next(iter(report.bad.items())))


def strict_error(path: str, reason: str) -> BadImageError:
    return BadImageError(f"{path}: {reason} (--strict stops at the first bad file; "
                         "without it, bad files are skipped and counted)")
