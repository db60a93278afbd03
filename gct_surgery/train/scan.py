"""Scanning one split of an image folder: which files are samples, with which label,
and what else the folder holds (``DataReport``).

Labels follow the class *folder names* (natural sort, as timm sorts them), including
a folder with no images. Images anywhere below a class folder belong to that class.

Symlinks never relabel or repeat data (docs/reliability.md):

- a link to a folder is followed only when it stays inside its own class folder and
  does not point back up to a folder being walked; a link to another class, to a
  folder above it (``up -> ..``) or out of the data folder is skipped and reported;
- a link to an image file is followed when it points out of the data folder (a folder
  of links into an image store) or inside its own class; one into another class or
  another split is skipped and reported;
- every image counts once: a second path to the same file (through a link) is skipped;
- a class folder that is, or links to, another class's folder (or a folder above the
  split) is an error: its images would carry two labels;
- a self-referencing link (ELOOP) or a broken one is reported, never a traceback.

The walk uses ``os.scandir``, so a regular file costs no extra ``stat``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from timm.utils.misc import natural_key

from ..errors import DataError
from .data_report import DataReport

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# timm's extensions and torchvision's: a .webp or .bmp folder is read, not ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, False for a link loop (ELOOP) or a vanished entry."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def class_folders(folder: Path) -> list[str]:
    """The class folder names of a split, in timm's natural order; hidden ones skipped."""
    try:
        names = [e.name for e in os.scandir(folder) if not e.name.startswith(".") and _is_dir(e)]
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None
    return sorted(names, key=natural_key)


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_split(folder: Path, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], DataReport]:
    """Every image file below each class folder, with its label, and what was not one.

    Entries that cannot possibly be read (a broken symlink, a pipe or socket named like
    an image, a folder that cannot be listed) are reported as bad here and never
    opened: opening a pipe would block forever.
    """
    report = DataReport()
    for entry in sorted(os.scandir(folder), key=lambda e: natural_key(e.name)):
        if entry.name.startswith(".") or not _is_dir(entry):
            report.ignored.append(entry.path)  # .DS_Store, or a loose file in no class folder
    classes = [(n, label) for n, label in sorted(class_to_idx.items(), key=lambda kv: kv[1])
               if (folder / n).is_dir()]  # a class the train split has and this split may lack
    walk = _Walk(folder, {n: os.path.realpath(folder / n) for n, _ in classes}, report)
    for name, label in classes:
        found, bad_before = len(walk.samples), len(report.bad)
        walk.scan_class(name, label)
        if len(walk.samples) == found and len(report.bad) == bad_before:
            report.empty_classes.append(name)
    samples = walk.deduplicated()
    samples.sort(key=lambda s: natural_key(s[0]))
    return samples, report


class _Walk:
    """One split's walk: samples reached directly, and those reached through a link
    (kept only when no other path reaches the same file)."""

    def __init__(self, folder: Path, class_real: dict[str, str], report: DataReport) -> None:
        self.folder, self.report, self.class_real = str(folder), report, class_real
        self.data_real = os.path.realpath(folder.parent)  # DATA: the split's parent
        self.split_real = os.path.realpath(folder)
        self.samples: list[tuple[str, int]] = []
        self.linked: list[tuple[str, int, str]] = []  # (path, label, real path)
        self.class_dirs: dict[int, tuple[str, str]] = {}  # label -> (walked path, real path)
        self._check_classes()

    def _check_classes(self) -> None:
        """A class folder must not be (or link to) another class's folder or an ancestor."""
        links_first = sorted(self.class_real.items(),  # blame the link, not the folder it names
                             key=lambda kv: not os.path.islink(os.path.join(self.folder, kv[0])))
        for name, real in links_first:
            path = os.path.join(self.folder, name)
            if _inside(self.split_real, real):
                raise DataError(f"class folder {path} links to {real}, a folder above it: its "
                                "images would be counted again under another label; remove the link")
            for other, other_real in self.class_real.items():
                if other != name and (_inside(real, other_real) or _inside(other_real, real)):
                    raise DataError(
                        f"class folder {path} links to the folder of class {other!r} ({real}): "
                        "its images would carry two labels; make it a folder of its own or remove it")

    def scan_class(self, name: str, label: int) -> None:
        class_dir, class_real = os.path.join(self.folder, name), self.class_real[name]
        self.class_dirs[label] = (class_dir, class_real)
        stack = [(class_dir, class_real, False)]  # (walked path, real path, reached via a link)
        walking = {class_real}
        while stack:
            folder, real, via_link = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
            except OSError as e:
                self.report.bad[folder] = f"cannot list folder: {e.strerror or e}"
                continue
            for e in entries:
                if e.name.startswith("."):  # .DS_Store, ._x.jpg (AppleDouble), .ipynb_checkpoints
                    self.report.ignored.append(e.path)
                elif e.is_symlink():
                    self._link(e, label, real, class_real, stack, walking)
                elif e.is_dir():
                    sub = os.path.join(real, e.name)
                    walking.add(sub)
                    stack.append((e.path, sub, via_link))
                elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                    self.report.ignored.append(e.path)  # notes.txt, labels.csv
                elif e.is_file():
                    if via_link:
                        self.linked.append((e.path, label, os.path.join(real, e.name)))
                    else:
                        self.samples.append((e.path, label))
                else:
                    self.report.bad[e.path] = "not a regular file (a pipe or device?)"

    def _link(self, e: os.DirEntry, label: int, real_folder: str, class_real: str,
              stack: list, walking: set) -> None:
        """A symlink inside a class folder: follow it, or report why not."""
        is_image = e.name.lower().endswith(IMAGE_EXTENSIONS)
        try:
            mode = os.stat(e.path).st_mode
        except OSError as err:
            reason = "a symlink loop" if err.errno == errno.ELOOP else "broken symlink"
            if is_image:
                self.report.bad[e.path] = reason
            else:
                self.report.links[e.path] = reason
            return
        target = os.path.realpath(e.path)
        if stat.S_ISDIR(mode):
            if _inside(real_folder, target):
                self.report.links[e.path] = f"links to {target}, which contains it"
            elif not _inside(target, class_real):
                self.report.links[e.path] = self._elsewhere(target, "a folder")
            elif target in walking:
                self.report.links[e.path] = f"links to {target}, already scanned"
            else:
                walking.add(target)
                stack.append((e.path, target, True))
        elif not is_image:
            self.report.ignored.append(e.path)
        elif not stat.S_ISREG(mode):
            self.report.bad[e.path] = "not a regular file (a pipe or device?)"
        elif _inside(target, self.data_real) and not _inside(target, class_real):
            self.report.links[e.path] = self._elsewhere(target, "an image")
        else:
            self.linked.append((e.path, label, target))

    def _elsewhere(self, target: str, what: str) -> str:
        for name, real in self.class_real.items():
            if _inside(target, real):
                return f"links to {what} of class {name!r} ({target}): it would get two labels"
        if _inside(target, self.data_real):
            return f"links to {what} elsewhere in the data folder ({target})"
        return f"links out of the data folder ({target})"

    def deduplicated(self) -> list[tuple[str, int]]:
        """The samples plus those reached through links, each file once: a file reached
        directly keeps its own path; of several links to one file, the first counts."""
        if not self.linked:
            return self.samples
        owner: dict[str, str] = {}
        for path, label in self.samples:
            walked, real = self.class_dirs[label]
            owner[real + path[len(walked):]] = path
        samples = list(self.samples)
        for path, label, real in self.linked:
            if real in owner:
                self.report.links[path] = f"the same file as {owner[real]}, counted once"
            else:
                owner[real] = path
                samples.append((path, label))
        return samples


def fingerprint(samples: list[tuple[str, int]], root: str) -> str:
    """A short hash of the (relative path, label) pairs of a split: a resumed run compares
    it with the one recorded at the start to see whether the data changed."""
    h = hashlib.sha256()
    cut = len(str(root).rstrip(os.sep)) + 1
    for path, label in samples:
        h.update(f"{path[cut:]}\t{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
