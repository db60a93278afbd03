"""The data folder on disk: which layout it has, the datasets each split gives, the
class map, and the scan of a split folder.

Three layouts (docs/finetuning.md, "Data layouts"):

- folders: ``DATA/train/<class>/**`` and ``DATA/val/<class>/**`` (or ``validation/``);
- CSV: ``DATA/train.csv`` and ``DATA/val.csv``, a header row naming the columns
  ``path`` and ``label``, then one row per image: a path relative to ``DATA`` (or
  absolute) and a class name;
- train only (a folder or a CSV) with ``--val-split F``: a share ``F`` of each class
  is held out for validation, chosen by ``--seed``. The run records both, so a
  ``--resume`` and ``eval --split val`` see exactly the held-out files again.

A split that is both a folder and a CSV is read from the folder. ``--class-map``
(timm's ``.txt`` format: one name per line, in label order) fixes the class order; a
class in the data but not in the map is refused by name.

A split folder is scanned as torchvision's ``make_dataset`` does (``os.walk``
following links, timm's and torchvision's image extensions), labels by class folder
name in timm's natural order, empty folders included. ``make_dataset`` itself cannot
be used: links are followed without limit there (``up -> ..`` plus ``self -> .``
would walk 2**40 paths). Here a link is pruned when it leads out of its class, into
another class or back up, and a file reached twice counts once, so links never
relabel or repeat data (docs/reliability.md). Hidden and non-image files are ignored,
a broken link or a pipe named like an image is bad and never opened (a pipe would
block), a CSV row whose file is missing is bad; all are reported.
"""
from __future__ import annotations

import csv
import errno
import logging
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.utils.misc import natural_key

from ..errors import DataError
from .config import COLOR_JITTER, CROP_SCALE, HFLIP, TrainConfig, setting
from .data import DataReport, ImageFolderDataset

_logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# timm's extensions and torchvision's: a .webp or .bmp folder is read, not ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")
SHOWN = 5  # class names shown in a message


@dataclass(frozen=True)
class DataOptions:
    """How the classification task reads its data: the layout's choices (a held-out
    share, a class map) and the train augmentation's strength."""

    val_split: float | None = None
    seed: int = 0
    class_map: str | None = None
    crop_scale: float = CROP_SCALE
    hflip: float = HFLIP
    color_jitter: float = COLOR_JITTER

    @classmethod
    def from_config(cls, config: TrainConfig | dict | None) -> "DataOptions":
        """The options a run's config (or a checkpoint's recorded one) asks for; with
        no config (None), the defaults."""
        return cls(**{k: setting(config, k, f.default)
                      for k, f in cls.__dataclass_fields__.items()})


def recorded_config(meta: Any) -> dict:
    """The config of the run that last fine-tuned a checkpoint (its last ``recipe``
    event), or {}."""
    recipes = [e for e in getattr(meta, "history", [])
               if isinstance(e, dict) and e.get("action") == "recipe"]
    config = recipes[-1].get("config") if recipes else None
    return config if isinstance(config, dict) else {}


def recorded_options(meta: Any) -> DataOptions:
    """The layout options of the run that last fine-tuned a checkpoint: evaluation holds
    out the same files as that run did."""
    config = recorded_config(meta)
    val_split, seed = config.get("val_split"), config.get("seed", 0)
    share_ok = val_split is None or (isinstance(val_split, (int, float)) and 0 < val_split < 1)
    return DataOptions(val_split=val_split, seed=seed) if share_ok and isinstance(seed, int) \
        else DataOptions()


def load_class_map(path: str | os.PathLike) -> dict[str, int]:
    """timm's ``.txt`` class map: one class name per line, its line number its index
    (timm's ``.pkl`` form is refused: a data file is never unpickled here)."""
    from timm.data.readers.class_map import load_class_map as timm_load

    if not Path(path).is_file() or Path(path).suffix.lower() != ".txt":
        raise DataError(f"--class-map {path}: give a .txt file with one class name per line, "
                        "in label order (timm's class map)")
    try:
        mapping = timm_load(str(path))
    except Exception as e:  # timm raises assertions and ValueErrors on a malformed map
        raise DataError(f"--class-map {path} cannot be read ({type(e).__name__}: {e}); "
                        "write one class name per line, or `name index`") from None
    if "" in mapping or sorted(mapping.values()) != list(range(len(mapping))):
        raise DataError(f"--class-map {path}: a blank or repeated line; write each class name "
                        "once, one per line")
    return dict(mapping)


# --- layouts ---------------------------------------------------------------------------

def split_source(root: str | Path, split: str, required: bool = False, hint: str = ""
                 ) -> Path | None:
    """Where one split is: its folder, else its CSV, else None (``required``: an error
    ending in ``hint``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    names = SPLIT_FOLDERS.get(split, (split,))
    for candidate in [root / n for n in names] + [root / f"{n}.csv" for n in names]:
        if candidate.is_dir() if candidate.suffix != ".csv" else candidate.is_file():
            return candidate
    if required:
        raise DataError(f"{root} has no {split} split: expected {root}/{names[0]}/<class>/ or "
                        f"{root}/{names[0]}.csv{hint}")
    return None


def open_datasets(root: str | Path, options: DataOptions, *, train_transform=None,
                  val_transform=None, channels: int = 3
                  ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and val datasets of any layout, labelled alike."""
    root = Path(root)
    train_src, val_src = split_source(root, "train", True), split_source(root, "val")
    if val_src is not None and options.val_split:
        raise DataError(f"{root} has a val split ({val_src}); drop --val-split, or move {val_src} "
                        "away to hold out part of train instead")
    if val_src is None and not options.val_split:
        raise DataError(f"{root} has no val split ({root}/val/ or {root}/val.csv); pass "
                        "--val-split 0.2 to hold out 20% of each class of train")
    class_map = load_class_map(options.class_map) if options.class_map else None
    train = _open(root, train_src, class_map, train_transform, channels)
    if options.val_split:
        return _hold_out(train, options, train_transform, val_transform)
    return train, _open(root, val_src, train.class_to_idx, val_transform, channels)


def open_split(root: str | Path, split: str, options: DataOptions = DataOptions(), *,
               class_to_idx: dict[str, int] | None = None, transform=None, channels: int = 3
               ) -> ImageFolderDataset:
    """One split as a dataset, e.g. for evaluation; ``class_to_idx`` (the checkpoint's)
    keeps the labels, a class it lacks is an error. On a train-only folder the recorded
    ``--val-split`` gives ``val`` (the held-out files) and ``train`` (the rest)."""
    root = Path(root)
    if split in ("train", *SPLIT_FOLDERS["val"]) and options.val_split \
            and split_source(root, "val") is None:
        train = _open(root, split_source(root, "train", True), class_to_idx, transform, channels)
        kept, held = _hold_out(train, options, transform, transform)
        return kept if split == "train" else held
    hint = ("; the checkpoint was not fine-tuned with --val-split, so no share of train is "
            "held out: pass --split train" if split in SPLIT_FOLDERS["val"] else "")
    return _open(root, split_source(root, split, True, hint), class_to_idx, transform, channels)


def _open(root: Path, source: Path, class_to_idx: dict[str, int] | None, transform,
          channels: int) -> ImageFolderDataset:
    """A folder or CSV split as a dataset, labelled by ``class_to_idx`` (the train
    split's, a class map's, a checkpoint's) or else by its own class names."""
    if source.suffix == ".csv":
        listed, report, classes = read_csv_split(source, root)
    else:
        try:  # in timm's natural order, hidden ones skipped (torchvision's find_classes
            # sorts c10 before c2 and would make .ipynb_checkpoints a class)
            classes = sorted((e.name for e in os.scandir(source)  # isdir: False on a link loop
                              if not e.name.startswith(".") and os.path.isdir(e)), key=natural_key)
        except OSError as e:
            raise DataError(f"cannot list {source}: {e.strerror or e}") from None
        if not classes:
            raise DataError(f"{source} has no class folders: put images in {source}/<class>/")
    unknown = [c for c in classes if class_to_idx is not None and c not in class_to_idx]
    if unknown:
        more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
        raise DataError(f"{source} has {len(classes)} classes and the labels in use lack: "
                        f"{', '.join(unknown[:SHOWN])}{more}; add them to the --class-map file, "
                        "or remove them from the data")
    mapping = class_to_idx or {c: i for i, c in enumerate(classes)}
    if source.suffix == ".csv":
        samples = [(p, mapping[c]) for p, c in listed]
        present = {c for _, c in listed}
        report.empty_classes += [c for c in mapping if c not in present]
        where = "lists no readable image path; paths are relative to the data folder"
    else:
        samples, report = scan_split(source, mapping)
        where = f"holds no image file ending in {', '.join(IMAGE_EXTENSIONS)}"
    if not samples:
        raise DataError(f"{source} {where}")
    for name in report.empty_classes:
        _logger.warning("%s/%s holds no images; it keeps label %d", source, name, mapping[name])
    return ImageFolderDataset(source if source.suffix != ".csv" else root, samples, mapping,
                              report=report, transform=transform, channels=channels)


def _hold_out(train: ImageFolderDataset, options: DataOptions, kept_transform, held_transform
              ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The rest of train and the held-out share: ``options.val_split`` of each class
    (rounded, at least one of a class of two or more, never all), chosen from
    ``options.seed`` and the class's files only, so the same data and seed always give
    the same split, in the input order. The rest keeps train's report, the share
    reports its own bad files; both were checked with train."""
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(train.samples):
        by_class.setdefault(label, []).append(i)
    held: set[int] = set()
    for label, indices in sorted(by_class.items()):
        n = len(indices)  # at least one of a class of two or more, never all
        k = min(max(round(n * options.val_split), 1), n - 1) if n >= 2 else 0
        held.update(random.Random(f"val-split:{options.seed}:{label}").sample(indices, k))
    if not held:
        raise DataError(f"--val-split {options.val_split} holds out no image of {train.root} "
                        "(every class has fewer than 2); pass a larger share or add a val split")
    parts = ([s for i, s in enumerate(train.samples) if i not in held],
             [s for i, s in enumerate(train.samples) if i in held])
    held_report = DataReport(bad={p: train.report.bad[p] for p, _ in parts[1]
                                  if p in train.report.bad})
    return tuple(ImageFolderDataset(train.root, part, train.class_to_idx, report=report,
                                    transform=tf, channels=train.channels, checked=True)
                 for part, report, tf in zip(parts, (train.report, held_report),
                                             (kept_transform, held_transform)))


def read_csv_split(path: Path, root: Path) -> tuple[list[tuple[str, str]], DataReport, list[str]]:
    """``(samples, report, classes)`` of a ``path,label`` CSV: samples as (path, class
    name), classes in timm's natural order. A listed path that is not a file (missing,
    a folder, a pipe: never opened) is reported as bad and skipped; a malformed row is
    an error naming its line."""
    report = DataReport()
    samples: dict[str, tuple[str, int]] = {}  # path -> (class, line)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}; write it as UTF-8 rows of path,label") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise DataError(f"{path}: the first row must name the columns, e.g. `path,label` "
                        f"(found {','.join(header) or 'nothing'})")
    p_col, l_col = header.index("path"), header.index("label")
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(p_col, l_col) or not row[p_col].strip() or not row[l_col].strip():
            raise DataError(f"{path} line {line}: expected a path and a label, "
                            f"got {','.join(row)!r:.80}")
        file, label = os.path.join(root, row[p_col].strip()), row[l_col].strip()
        first = samples.setdefault(file, (label, line))
        if first[0] != label:
            raise DataError(f"{path} lines {first[1]} and {line} give {row[p_col].strip()} "
                            f"two labels ({first[0]}, {label}); keep one")
    for file, (_, line) in samples.items():
        if not os.path.isfile(file):
            reason = ("broken symlink" if os.path.islink(file)
                      else "missing" if not os.path.exists(file)
                      else "a folder, not a file" if os.path.isdir(file)
                      else "not a regular file (a pipe or device?)")
            report.bad[file] = f"{reason} (listed in {path.name} line {line})"
    kept = [(p, c) for p, (c, _) in samples.items() if p not in report.bad]
    return kept, report, sorted({c for c, _ in samples.values()}, key=natural_key)


# --- scanning a split folder -----------------------------------------------------------

def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_split(folder: Path, class_to_idx: dict[str, int]
               ) -> tuple[list[tuple[str, int]], DataReport]:
    """Every image file below each class folder, with its label, and what was not one
    (module docstring)."""
    report = DataReport(ignored=sorted((e.path for e in os.scandir(folder)
                                        if e.name.startswith(".") or not os.path.isdir(e)),
                                       key=natural_key))
    real = {c: os.path.realpath(folder / c) for c in class_to_idx if (folder / c).is_dir()}
    _refuse_shared_class_folders(folder, real)
    found = []  # (reached through a link, path, label, real path)
    for name, label in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        if name in real:
            before = len(found) + len(report.bad)
            _walk_class(folder, name, label, real, report, found)
            if len(found) + len(report.bad) == before:
                report.empty_classes.append(name)
    owner, samples = {}, []
    for _, path, label, r in sorted(found, key=lambda f: f[0]):  # a direct path wins
        if r in owner:
            report.links[path] = f"the same file as {owner[r]}, counted once"
        else:
            owner[r] = path
            samples.append((path, label))
    return sorted(samples, key=lambda s: natural_key(s[0])), report


def _refuse_shared_class_folders(folder: Path, real: dict[str, str]) -> None:
    """A class folder must not be (or link to) another class's folder or an ancestor."""
    split_real = os.path.realpath(folder)
    for name, r in sorted(real.items(), key=lambda kv: not os.path.islink(folder / kv[0])):
        if _inside(split_real, r):
            raise DataError(f"class folder {folder / name} links to {r}, a folder above it: its "
                            "images would be counted again under another label; remove the link")
        for other, other_real in real.items():
            if other != name and (_inside(r, other_real) or _inside(other_real, r)):
                raise DataError(f"class folder {folder / name} links to the folder of class "
                                f"{other!r} ({r}): its images would carry two labels; make it "
                                "a folder of its own or remove it")


def _walk_class(folder: Path, name: str, label: int, real: dict[str, str], report: DataReport,
                found: list) -> None:
    """``make_dataset``'s walk of one class folder, pruned so that links stay inside it."""
    class_dir, class_real = str(folder / name), real[name]
    data_real = os.path.realpath(folder.parent)
    walked = set()

    def elsewhere(target: str, what: str) -> str:
        owner = next((n for n, r in real.items() if _inside(target, r)), None)
        return (f"links to {what} of class {owner!r} ({target}): it would get two labels"
                if owner is not None else
                f"links to {what} elsewhere in the data folder ({target})"
                if _inside(target, data_real) else f"links out of the data folder ({target})")

    def unlisted(e: OSError) -> None:
        report.bad[e.filename] = f"cannot list folder: {e.strerror or e}"

    for top, dirs, files in os.walk(class_dir, onerror=unlisted, followlinks=True):
        here = os.path.realpath(top)
        walked.add(here)
        via_link = here != class_real + top[len(class_dir):]
        kept = []
        for d in sorted(dirs, key=natural_key):
            path = os.path.join(top, d)
            if d.startswith("."):  # .ipynb_checkpoints, .git
                report.ignored.append(path)
                continue
            target = os.path.realpath(path)
            why = os.path.islink(path) and (
                f"links to {target}, which contains it" if _inside(here, target)
                else elsewhere(target, "a folder") if not _inside(target, class_real)
                else f"links to {target}, already scanned" if target in walked else None)
            if why:
                report.links[path] = why
            else:
                walked.add(target)
                kept.append(d)
        dirs[:] = kept
        for f in sorted(files, key=natural_key):
            path, is_image = os.path.join(top, f), f.lower().endswith(IMAGE_EXTENSIONS)
            is_link = os.path.islink(path)
            if f.startswith(".") or not (is_image or is_link):  # .DS_Store, ._x.jpg, notes.txt
                report.ignored.append(path)
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as e:
                reason = "a symlink loop" if e.errno == errno.ELOOP else "broken symlink"
                (report.bad if is_image else report.links)[path] = reason
                continue
            target = os.path.realpath(path) if is_link else os.path.join(here, f)
            if not is_image:
                report.ignored.append(path)
            elif not stat.S_ISREG(mode):
                report.bad[path] = "not a regular file (a pipe or device?)"
            elif is_link and _inside(target, data_real) and not _inside(target, class_real):
                report.links[path] = elsewhere(target, "an image")
            else:
                found.append((is_link or via_link, path, label, target))
