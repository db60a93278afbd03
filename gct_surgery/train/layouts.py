"""Which layout a data folder has, and the datasets each split gives.

Three layouts (docs/finetuning.md, "Data layouts"):

- folders: ``DATA/train/<class>/**`` and ``DATA/val/<class>/**`` (or ``validation/``);
- CSV: ``DATA/train.csv`` and ``DATA/val.csv``, a header row naming the columns
  ``path`` and ``label``, then one row per image: a path relative to ``DATA`` (or
  absolute) and a class name;
- train only (a folder or a CSV) with ``--val-split F``: a share ``F`` of each class
  is held out for validation, chosen by ``--seed``. The run records both, so a
  ``--resume`` and ``eval --split val`` see exactly the held-out files again.

A split that is both a folder and a CSV is read from the folder. ``--class-map``
(timm's ``.txt`` format: one name per line, in label order) fixes the class order;
a class in the data but not in the map is refused by name. Bad files follow the folder rules (``images.py``): a CSV row whose
file is missing is skipped and counted, as a broken symlink is in a folder.
"""
from __future__ import annotations

import csv
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.utils.misc import natural_key

from ..errors import DataError
from .config import COLOR_JITTER, CROP_SCALE, HFLIP, TrainConfig
from .data_report import DataReport
from .images import ImageFolderDataset, open_split
from .scan import SPLIT_FOLDERS, class_folders

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
        """The options a run's config (or a checkpoint's recorded one) asks for."""
        if config is None:
            return cls()
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        defaults = cls()
        return cls(**{k: get(k, getattr(defaults, k)) for k in cls.__dataclass_fields__})

    def augmentation(self) -> dict[str, float]:
        """The keyword arguments of ``loaders.create_transform``."""
        return {"crop_scale": self.crop_scale, "hflip": self.hflip, "color_jitter": self.color_jitter}


def recorded_options(meta: Any) -> DataOptions:
    """The options of the run that last fine-tuned a checkpoint (its last ``recipe``
    event): evaluation holds out the same files as that run did."""
    recipes = [e for e in getattr(meta, "history", []) if isinstance(e, dict) and e.get("action") == "recipe"]
    config = recipes[-1].get("config") if recipes else None
    if not isinstance(config, dict):
        return DataOptions()
    val_split, seed = config.get("val_split"), config.get("seed", 0)
    ok = (val_split is None or (isinstance(val_split, (int, float)) and 0 < val_split < 1)) and isinstance(seed, int)
    return DataOptions(val_split=val_split, seed=seed) if ok else DataOptions()


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


def split_source(root: str | Path, split: str) -> Path | None:
    """Where one split is: its folder, else its CSV, else None."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such data folder: {root}")
    names = SPLIT_FOLDERS.get(split, (split,))
    for candidate in [root / n for n in names] + [root / f"{n}.csv" for n in names]:
        if candidate.is_dir() if candidate.suffix != ".csv" else candidate.is_file():
            return candidate
    return None


def open_datasets(root: str | Path, options: DataOptions, *, train_transform=None, val_transform=None,
                  channels: int = 3) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and val datasets of any layout, labelled alike."""
    root = Path(root)
    train_src, val_src = split_source(root, "train"), split_source(root, "val")
    if train_src is None:
        raise DataError(f"{root} has no train split: expected {root}/train/<class>/ or {root}/train.csv")
    if val_src is not None and options.val_split:
        raise DataError(f"{root} has a val split ({val_src}); drop --val-split, or move {val_src} "
                        "away to hold out part of train instead")
    if val_src is None and not options.val_split:
        raise DataError(f"{root} has no val split ({root}/val/ or {root}/val.csv); pass --val-split 0.2 "
                        "to hold out 20% of each class of train")
    class_map = load_class_map(options.class_map) if options.class_map else None
    train = _open(root, train_src, class_map, train_transform, channels, "train")
    if options.val_split:
        kept, held = hold_out(train.reader.samples, options.val_split, options.seed)
        if not held:
            raise DataError(f"--val-split {options.val_split} holds out no image of {train_src} "
                            "(every class has fewer than 2); pass a larger share or add a val split")
        return (_subset(train, kept, train.report, train_transform),
                _subset(train, held, DataReport(), val_transform))
    return train, _open(root, val_src, train.class_to_idx, val_transform, channels, "val")


def open_eval_split(root: str | Path, split: str, options: DataOptions, *, class_to_idx=None,
                    transform=None, channels: int = 3) -> ImageFolderDataset:
    """One split for evaluation. On a train-only folder the recorded ``--val-split``
    gives ``val`` (the held-out files) and ``train`` (the rest)."""
    root = Path(root)
    source = split_source(root, split)
    held_split = split in ("train", *SPLIT_FOLDERS["val"]) and options.val_split \
        and split_source(root, "val") is None
    if held_split:
        train = _open(root, split_source(root, "train") or _no_split(root, "train"), class_to_idx,
                      transform, channels, "train")
        kept, held = hold_out(train.reader.samples, options.val_split, options.seed)
        if split == "train":
            return _subset(train, kept, train.report, transform)
        return _subset(train, held, DataReport(), transform)
    if source is None:
        hint = ("; the checkpoint was not fine-tuned with --val-split, so no share of train is "
                "held out: pass --split train" if split in SPLIT_FOLDERS["val"] else "")
        _no_split(root, split, hint)
    return _open(root, source, class_to_idx, transform, channels, split)


def _no_split(root: Path, split: str, hint: str = ""):
    names = SPLIT_FOLDERS.get(split, (split,))
    raise DataError(f"{root} has no {split} split: expected {root}/{names[0]}/<class>/ or "
                    f"{root}/{names[0]}.csv{hint}")


def _open(root: Path, source: Path, class_to_idx: dict[str, int] | None, transform, channels: int,
          split: str) -> ImageFolderDataset:
    if source.suffix == ".csv":
        samples, report, classes = read_csv_split(source, root)
        _check_known(classes, class_to_idx, source)
        mapping = class_to_idx or {c: i for i, c in enumerate(classes)}
        index = {c: i for i, c in mapping.items()}
        samples = [(p, mapping[c]) for p, c in samples]
        report.empty_classes += [index[i] for i in sorted(set(mapping.values()) - {t for _, t in samples})]
        dataset = ImageFolderDataset(root, mapping, transform=transform, scanned=(samples, report),
                                     channels=channels)
        if not len(dataset):
            raise DataError(f"{source} lists no readable image path ({len(report.bad)} missing); "
                            "paths are relative to the data folder")
        return dataset
    _check_known(class_folders(source), class_to_idx, source)
    return open_split(root, source.name, transform=transform, class_to_idx=class_to_idx,
                      channels=channels)


def _check_known(classes: list[str], class_to_idx: dict[str, int] | None, source: Path) -> None:
    """Classes of the data that the labels in use (a class map, the train split's or
    the checkpoint's) do not have are refused by name."""
    unknown = [c for c in classes if class_to_idx is not None and c not in class_to_idx]
    if unknown:
        more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
        raise DataError(f"{source} has classes the labels in use lack: {', '.join(unknown[:SHOWN])}"
                        f"{more}; add them to the --class-map file, or remove them from the data")


def _subset(base: ImageFolderDataset, samples: list[tuple[str, int]], report: DataReport,
            transform) -> ImageFolderDataset:
    return ImageFolderDataset(Path(base.reader.root), base.class_to_idx, transform=transform,
                              scanned=(samples, report), channels=base.channels)


def hold_out(samples: list[tuple[str, int]], fraction: float, seed: int
             ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(kept, held)``: ``fraction`` of each class held out (rounded, at least one of a
    class of two or more, never all), chosen from ``seed`` and the class's files only,
    so the same data and seed always give the same split. Both keep the input order."""
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    held: set[int] = set()
    for label, indices in sorted(by_class.items()):
        n = len(indices)
        k = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        held.update(random.Random(f"val-split:{seed}:{label}").sample(indices, k))
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def read_csv_split(path: Path, root: Path) -> tuple[list[tuple[str, str]], DataReport, list[str]]:
    """``(samples, report, classes)`` of a ``path,label`` CSV: samples as (path, class
    name), classes in timm's natural order. A missing or unreadable-at-a-glance file
    (a folder, a pipe) is reported as bad and skipped, as the folder scan does; a
    malformed row is an error naming its line."""
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
            raise DataError(f"{path} line {line}: expected a path and a label, got {','.join(row)!r:.80}")
        file = os.path.join(root, row[p_col].strip())
        label = row[l_col].strip()
        if file in samples:
            if samples[file][0] != label:
                raise DataError(f"{path} lines {samples[file][1]} and {line} give {row[p_col].strip()} two "
                                f"labels ({samples[file][0]}, {label}); keep one")
            continue
        samples[file] = (label, line)
        reason = _unreadable(file)
        if reason:
            report.bad[file] = f"{reason} (listed in {path.name} line {line})"
    kept = [(p, c) for p, (c, _) in samples.items() if p not in report.bad]
    classes = sorted({c for c, _ in samples.values()}, key=natural_key)
    return kept, report, classes


def _unreadable(file: str) -> str | None:
    """Why a listed file cannot be an image, without opening it (a pipe would block)."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        return "missing" if not os.path.islink(file) else "broken symlink"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe or device?)"
    return None
