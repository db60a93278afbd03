"""Image-classification folders: scanning a split, reading one image, and counting the
files real folders hold besides good images.

The layout is the one timm and torchvision read::

    DIR/train/<class>/**/*.png|jpg|...
    DIR/val/<class>/**/*          (or DIR/validation/<class>/**/*)

Labels follow the class *folder names* (natural sort, as timm sorts them), including
a folder with no images: an empty class never shifts the label of the next one, and
it is reported. Images anywhere below a class folder belong to that class.

Broken data never stops a run (see docs/reliability.md):

- a file that is not an image by name (``.DS_Store``, ``notes.txt``) or hidden is
  ignored, counted and reported;
- an image file that cannot be read (zero bytes, truncated, not an image, no
  permission, a broken symlink, a pipe) is replaced by the next readable sample of
  the split, deterministically, and counted; ``strict=True`` fails instead, naming
  the file;
- images of every mode become RGB correctly (``to_rgb``): 16-bit grey is scaled,
  not clipped; transparency is composited over white; CMYK is converted.

Batching these samples, and carrying the count home from worker processes, is
``loaders``' job.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.reader import Reader
from timm.utils.misc import natural_key

from ..errors import DataError

_logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# timm's extensions and torchvision's: a .webp or .bmp folder is read, not ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FIRST_FEW = 5  # bad or ignored files named in a report


class BadImageError(DataError):
    """An image file cannot be read (raised under ``strict`` only; else it is skipped)."""


# --- what a folder held besides good images -------------------------------------------

@dataclass
class DataReport:
    """Bad files skipped, non-image files ignored and empty classes, for the end of a run.

    ``bad`` holds every distinct bad file with its reason; ``skipped`` counts the times
    a bad file was passed over (it is met again every epoch).
    """

    bad: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def add_skipped(self, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Count the bad files passed over; return those not seen before."""
        new = [(p, r) for p, r in dict(skipped).items() if p not in self.bad]
        self.bad.update(new)
        self.skipped += len(skipped)
        return new

    def merge(self, other: "DataReport") -> "DataReport":
        self.bad.update((p, r) for p, r in other.bad.items() if p not in self.bad)
        self.skipped += other.skipped
        known = set(self.ignored)
        self.ignored += [p for p in other.ignored if p not in known]
        self.empty_classes += [c for c in other.empty_classes if c not in self.empty_classes]
        return self

    def __bool__(self) -> bool:
        return bool(self.bad or self.ignored or self.empty_classes)

    def to_dict(self) -> dict:
        """Counts and the first few files: the report in a run's result and ``--json``."""
        return {"bad_files": len(self.bad), "skipped_samples": self.skipped,
                "first_bad": [{"path": p, "reason": r} for p, r in itertools.islice(self.bad.items(), FIRST_FEW)],
                "ignored_files": len(self.ignored), "first_ignored": self.ignored[:FIRST_FEW],
                "empty_classes": list(self.empty_classes)}

    def to_state(self) -> dict:
        """Everything, as plain data (kept in the train state across a resume)."""
        return {"bad": dict(self.bad), "skipped": self.skipped, "ignored": list(self.ignored),
                "empty_classes": list(self.empty_classes)}

    @classmethod
    def from_state(cls, d: dict) -> "DataReport":
        return cls(dict(d.get("bad", {})), int(d.get("skipped", 0)), list(d.get("ignored", [])),
                   list(d.get("empty_classes", [])))

    def lines(self) -> list[str]:
        return report_lines(self.to_dict())


def report_lines(d: dict) -> list[str]:
    """A report (``DataReport.to_dict()``) as a few human lines; none for clean data."""
    out = []
    if d.get("bad_files"):
        first = "; ".join(f"{b['path']} ({b['reason']})" for b in d["first_bad"])
        more = f" and {d['bad_files'] - len(d['first_bad'])} more" if d["bad_files"] > len(d["first_bad"]) else ""
        out.append(f"{d['bad_files']} unreadable image file(s) skipped ({d['skipped_samples']} "
                   f"time(s) in all; --strict stops instead): {first}{more}")
    if d.get("ignored_files"):
        first = ", ".join(d["first_ignored"])
        more = f" and {d['ignored_files'] - len(d['first_ignored'])} more" if d["ignored_files"] > len(d["first_ignored"]) else ""
        out.append(f"{d['ignored_files']} file(s) ignored, not images by name: {first}{more}")
    if d.get("empty_classes"):
        out.append(f"class folder(s) without images: {', '.join(d['empty_classes'])} "
                   "(they keep their label index: labels follow folder names)")
    return out


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


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert one file (the file is closed on return)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now: a truncated file fails here, not inside a transform
        return to_rgb(img)


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


# --- scanning a split ----------------------------------------------------------------

def split_dir(root: str | Path, split: str) -> Path:
    """The folder of one split, e.g. ``DIR/val`` or ``DIR/validation``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    for name in SPLIT_FOLDERS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{root}/{n}/" for n in SPLIT_FOLDERS.get(split, (split,)))
    raise DataError(f"{root} has no {split} split: expected {wanted} with one folder per class")


def class_folders(folder: Path) -> list[str]:
    """The class folder names of a split, in timm's natural order; hidden ones skipped."""
    try:
        names = [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None
    return sorted(names, key=natural_key)


def scan_split(folder: Path, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], DataReport]:
    """Every image file below each class folder, with its label, and what was not one.

    Entries that cannot possibly be read (a broken symlink, a pipe or socket named like
    an image, a folder that cannot be listed) are reported as bad here and never
    opened: opening a pipe would block forever. Uses ``os.scandir``, so a regular file
    costs no extra ``stat``.
    """
    samples: list[tuple[str, int]] = []
    report = DataReport()
    for entry in sorted(os.scandir(folder), key=lambda e: natural_key(e.name)):
        if entry.name.startswith(".") or not entry.is_dir():
            report.ignored.append(entry.path)  # .DS_Store, or a loose file in no class folder
    for name, label in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a class the train split has and this split lacks
        found, bad_before = len(samples), len(report.bad)
        _scan_class(class_dir, label, samples, report)
        if len(samples) == found and len(report.bad) == bad_before:
            report.empty_classes.append(name)
    samples.sort(key=lambda s: natural_key(s[0]))
    return samples, report


def _scan_class(class_dir: Path, label: int, samples: list, report: DataReport) -> None:
    stack, seen = [str(class_dir)], {os.path.realpath(class_dir)}
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
        except OSError as e:
            report.bad[folder] = f"cannot list folder: {e.strerror or e}"
            continue
        for e in entries:
            if e.name.startswith("."):  # .DS_Store, ._x.jpg (AppleDouble), .ipynb_checkpoints
                report.ignored.append(e.path)
            elif e.is_dir():
                real = os.path.realpath(e.path)
                if real not in seen:  # a symlink loop is walked once
                    seen.add(real)
                    stack.append(e.path)
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                report.ignored.append(e.path)  # notes.txt, labels.csv
            elif e.is_file():
                samples.append((e.path, label))
            elif e.is_symlink() and not os.path.exists(e.path):
                report.bad[e.path] = "broken symlink"
            else:
                report.bad[e.path] = "not a regular file (a pipe or device?)"


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
    scan's ``report``, and bad files replaced by the next readable sample.

    ``load(i)`` returns ``((image, target), skipped)``: ``skipped`` lists the
    ``(path, reason)`` of the bad files passed over, so that a worker process can
    send them to the main process with the batch. ``dataset[i]`` returns the sample
    alone and counts into ``report`` (single process use).
    """

    def __init__(self, folder: Path, class_to_idx: dict[str, int], *, transform=None) -> None:
        samples, report = scan_split(folder, class_to_idx)
        super().__init__(str(folder), reader=_Samples(folder, samples), transform=transform)
        self._class_to_idx = dict(class_to_idx)
        self.report = report
        self._bad: dict[int, str] = {}  # this process's memo of bad indices

    @property
    def class_to_idx(self) -> dict[str, int]:
        return dict(self._class_to_idx)

    @property
    def classes(self) -> list[str]:
        return [c for c, _ in sorted(self._class_to_idx.items(), key=lambda kv: kv[1])]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.reader.samples]

    def load(self, index: int, *, replace: bool = True) -> tuple[tuple[Any, int] | None, list[tuple[str, str]]]:
        """The sample at ``index``, or (``replace``) the next readable one, and the bad
        files passed. ``(None, skipped)`` when it is bad and ``replace`` is off, or when
        no file of the split can be read."""
        samples = self.reader.samples
        skipped: list[tuple[str, str]] = []
        for attempt in range(len(samples) if replace else 1):
            i = (index + attempt) % len(samples)
            path, target = samples[i]
            reason = self._bad.get(i)
            if reason is None:
                try:
                    img = read_image(path)
                    return (self.transform(img) if self.transform is not None else img, target), skipped
                except Exception as e:  # any decoder failure is the file's, not the run's
                    reason = self._bad[i] = describe_failure(path, e)
            skipped.append((path, reason))
        return None, skipped

    def __getitem__(self, index: int):
        sample, skipped = self.load(index)
        self.report.add_skipped(skipped)
        if sample is None:
            raise no_readable_image(self.reader.root, skipped)
        return sample


def no_readable_image(folder: str, skipped: list[tuple[str, str]]) -> DataError:
    path, reason = skipped[0] if skipped else (folder, "empty")
    return DataError(f"no image in {folder} can be read ({len(skipped)} tried), e.g. {path}: {reason}")


def open_split(root: str | Path, split: str, *, transform=None,
               class_to_idx: dict[str, int] | None = None, strict: bool = False) -> ImageFolderDataset:
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
                                 transform=transform)
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
