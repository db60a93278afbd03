"""Image data at run time: what a folder held besides good images (``DataReport``),
reading and checking an image, the dataset that replaces bad files, timm's transforms,
and the loaders. Scanning a folder on disk is ``layouts.py``.

Broken data never stops a run (docs/reliability.md). Every image is decoded once when
its split is opened, on a thread pool in the main process (under a second for the
bundled 4,000 PNGs, ~2 ms of CPU per large JPEG), so the unreadable ones are known
before any worker starts: in
training each is replaced by a readable image of its class drawn from the seed, the
epoch and the index (a pure function, the same in every worker, rank and resumed run);
evaluation leaves it out; ``--strict`` stops, naming it. Images of every mode become
RGB correctly (``to_rgb``).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform as timm_transform, resolve_data_config as timm_resolve
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info
from torch.utils.data._utils.worker import _generate_state

from ..errors import DataError
from ..io.sources import fit_channels
from .config import COLOR_JITTER, CROP_SCALE, HFLIP

_logger = logging.getLogger(__name__)

FIRST_FEW = 5  # files named in a report line
BAD_SHARE = 0.05  # a class with more unreadable files than this share is warned about


class BadImageError(DataError):
    """An image file cannot be read, under ``--strict``."""


# --- the report ------------------------------------------------------------------------

@dataclass
class DataReport:
    """What a data folder held besides good images, for the end of a run or an eval:
    unreadable files (``bad``: path -> reason), files ignored (not images by name),
    symlinks not followed (``links``: path -> why), empty class folders, and classes
    with more than ``BAD_SHARE`` of their files unreadable (``bad_share``: class ->
    ``[bad, files]``)."""

    bad: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    bad_share: dict[str, list[int]] = field(default_factory=dict)

    def merge(self, other: "DataReport") -> "DataReport":
        """Add ``other`` (another split's, another rank's); merging twice changes nothing."""
        for mine, theirs in ((self.bad, other.bad), (self.links, other.links),
                             (self.bad_share, other.bad_share)):
            mine.update((key, value) for key, value in theirs.items() if key not in mine)
        for name in ("ignored", "empty_classes"):
            mine, known = getattr(self, name), set(getattr(self, name))
            mine += [p for p in getattr(other, name) if p not in known]
        return self

    def to_dict(self) -> dict:
        """Counts and the first few files: the report in a result and in ``--json``."""
        def first(d: dict) -> list[dict]:
            return [{"path": p, "reason": r} for p, r in itertools.islice(d.items(), FIRST_FEW)]
        return {"bad_files": len(self.bad), "first_bad": first(self.bad),
                "ignored_files": len(self.ignored), "first_ignored": self.ignored[:FIRST_FEW],
                "empty_classes": list(self.empty_classes),
                "skipped_links": len(self.links), "first_skipped_links": first(self.links),
                "bad_share": {k: list(v) for k, v in self.bad_share.items()}}


def report_lines(d: dict) -> list[str]:
    """A report (``DataReport.to_dict()``) as a few human lines; none for clean data."""
    def first(items: list, total: int) -> str:
        named = [f"{b['path']} ({b['reason']})" if isinstance(b, dict) else b for b in items]
        return "; ".join(named) + (f" and {total - len(items)} more" if total > len(items) else "")
    counted = (("bad_files", "first_bad",
                "unreadable image file(s) skipped (--strict stops instead)"),
               ("ignored_files", "first_ignored", "file(s) ignored, not images by name"),
               ("skipped_links", "first_skipped_links", "symlink(s) not followed"))
    out = [f"{d[n]} {words}: {first(d[named], d[n])}" for n, named, words in counted if d.get(n)]
    shares = (d.get("bad_share") or {}).items()
    out += [bad_share_line(name, bad, total) for name, (bad, total) in shares]
    if d.get("empty_classes"):
        out.append(f"class folder(s) without images: {', '.join(d['empty_classes'])} "
                   "(they keep their label index: labels follow folder names)")
    return out


def bad_share_line(name: str, bad: int, total: int) -> str:
    return (f"class {name}: {bad} of {total} file(s) ({100 * bad / max(total, 1):.0f}%) are "
            f"unreadable; each is replaced by a random readable image of the class, so those "
            "few are seen more often. Clean the folder, or pass --strict to stop at a bad file")


def check_strict(report: DataReport) -> None:
    """Under ``--strict``: fail at the first bad file."""
    if report.bad:
        path, reason = next(iter(report.bad.items()))
        raise BadImageError(f"{path}: {reason} (--strict stops at the first bad file; "
                            "without it, bad files are skipped and counted)")


# --- reading one image -----------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, correctly.

    PIL's own ``convert("RGB")`` clips 16-bit grey to 255 (a white image) and drops
    alpha, exposing whatever colour transparent pixels happen to store. Here 16-bit
    values are scaled (v / 257, so 65535 -> 255), transparency (RGBA, LA, palette with
    a transparent index) is composited over white, and CMYK, palette, grey and
    bilevel images go through PIL's conversions.
    """
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


def read_image(path: str | os.PathLike, channels: int = 3, *, draft: bool = False
               ) -> Image.Image:
    """Open, fully decode and convert one file (closed on return): RGB, or grey ("L")
    for a model with one input channel. ``draft``: a JPEG at 1/8 size (a check)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if draft:
            img.draft(img.mode, (1, 1))
        img.load()  # decode now: a truncated file fails here, not inside a transform
        img = to_rgb(img)
        return img.convert("L") if channels == 1 else img


def unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as an image, or None."""
    try:
        read_image(path, draft=True)
        return None
    except Exception as error:  # any decoder failure is the file's, not the run's
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        text = " ".join(str(error).split())[:120]
        known = {PermissionError: "permission denied", IsADirectoryError: "a folder, not a file",
                 FileNotFoundError: "missing (a broken symlink?)",
                 UnidentifiedImageError: "not an image PIL can read"}.get(type(error))
        return known or ("truncated image" if "truncated" in text.lower()
                         else f"{type(error).__name__}: {text}" if text else type(error).__name__)


def unreadable_files(paths: list[str]) -> dict[str, str]:
    """Each file decoded once, on threads (PIL frees the GIL): why each unreadable one is."""
    with ThreadPoolExecutor() as pool:
        return {p: why for p, why in zip(paths, pool.map(unreadable, paths, chunksize=64)) if why}


def check_images(samples: list[tuple[str, int]], report: DataReport, classes: list[str]
                 ) -> None:
    """Decode every sample once: the unreadable ones go into ``report.bad``, a class
    with more than ``BAD_SHARE`` of its files unreadable into ``report.bad_share``."""
    reasons = unreadable_files([path for path, _ in samples])
    bad = Counter()
    for path, label in samples:
        if path in reasons:
            report.bad[path], bad[label] = reasons[path], bad[label] + 1
    files = Counter(label for _, label in samples)
    for label, n in sorted(bad.items()):
        if n > BAD_SHARE * files[label]:
            report.bad_share[classes[label]] = [n, files[label]]
            _logger.warning("%s", bad_share_line(classes[label], n, files[label]))


# --- the dataset -----------------------------------------------------------------------

class ImageFolderDataset(Dataset):
    """``(image, label)`` over ``samples`` (path, label). A file that cannot be read is
    checked here (unless ``report`` already names it) and replaced by a readable image
    of its class drawn from ``seed``, ``epoch`` and the index (``pick``); evaluation
    reads ``readable_indices`` only."""

    def __init__(self, root: str | Path, samples: list[tuple[str, int]],
                 class_to_idx: dict[str, int], *, report: DataReport | None = None,
                 transform=None, channels: int = 3, checked: bool = False) -> None:
        self.root, self.samples, self.class_to_idx = str(root), samples, dict(class_to_idx)
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.report = report if report is not None else DataReport()
        if not checked:
            check_images(samples, self.report, self.classes)
        self.transform, self.channels = transform, channels
        self.seed = self.epoch = 0  # set by the training loader
        self.readable_indices = [i for i, (p, _) in enumerate(samples) if p not in self.report.bad]
        if not self.readable_indices:
            path = samples[0][0] if samples else self.root
            raise DataError(f"no image in {self.root} can be read ({len(samples)} tried), "
                            f"e.g. {path}: {self.report.bad.get(path, 'empty')}")
        self._by_class: dict[int, list[int]] = {}
        for i in self.readable_indices:
            self._by_class.setdefault(samples[i][1], []).append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def pick(self, index: int) -> int:
        """``index``, or for an unreadable file a readable one of its class (of the split,
        if the class has none), chosen from (seed, epoch, index) only."""
        if self.samples[index][0] not in self.report.bad:
            return index
        pool = self._by_class.get(self.samples[index][1]) or self.readable_indices
        return pool[random.Random(f"{self.seed}:{self.epoch}:{index}").randrange(len(pool))]

    def __getitem__(self, index: int):
        path, label = self.samples[self.pick(index)]
        img = read_image(path, self.channels)
        return (self.transform(img) if self.transform is not None else img), label

    def fingerprint(self) -> str:
        """A short hash of the (relative path, label) pairs: a resumed run compares it
        with the one recorded at the start to see whether the data changed."""
        h, cut = hashlib.sha256(), len(self.root.rstrip(os.sep)) + 1
        for path, label in self.samples:
            h.update(f"{path[cut:]}\t{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]


# --- transforms ----------------------------------------------------------------------

def resolve_data_config(recorded: dict, model: torch.nn.Module | None = None,
                        img_size: int | None = None) -> dict:
    """timm's data config from what the checkpoint records, with ``img_size`` overriding
    the spatial size (e.g. 32 px for a quick run on small images).

    What neither the record nor a timm model's pretrained config gives is timm's
    ImageNet default; the config then lists it under ``assumed`` and a warning names
    the values, since a user's model may have been normalised otherwise."""
    args: dict[str, Any] = {k: recorded[k] for k in
                            ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
                            if recorded.get(k) is not None}
    if img_size is not None:
        args["input_size"] = (args.get("input_size", (3,))[0], img_size, img_size)
    fit_channels(args, args.get("input_size", (3,))[0])
    cfg = timm_resolve(args, model=model)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    fit_channels(cfg, cfg["input_size"][0])
    own = getattr(model, "pretrained_cfg", None) or {}
    assumed = [k for k in ("mean", "std", "interpolation", "crop_pct")
               if k in recorded.get("assumed", []) or (k not in args and own.get(k) is None)]
    if assumed:
        cfg["assumed"] = assumed
        _logger.warning("no %s recorded for this model: assumed %s; if it was trained "
                        "otherwise, record its own with `gct-surgery inject ... --mean M --std S "
                        "--interpolation I --crop-pct C` (or save(..., data={...}))",
                        ", ".join(assumed), ", ".join(f"{k} {cfg[k]}" for k in assumed))
    return cfg


def create_transform(cfg: dict, *, training: bool, augment: bool = True,
                     crop_scale: float = CROP_SCALE, hflip: float = HFLIP,
                     color_jitter: float = COLOR_JITTER):
    """timm's train or eval transform for a resolved data config. The train transform
    crops at least ``crop_scale`` of the image, flips with probability ``hflip`` and
    jitters colour by ``color_jitter``: milder than timm's from-scratch defaults
    (0.08, 0.5, 0.4), which suit ImageNet from scratch, not a few fine-tuning epochs."""
    return timm_transform(
        input_size=tuple(cfg["input_size"]), is_training=training, no_aug=not augment,
        scale=(crop_scale, 1.0), hflip=hflip, color_jitter=color_jitter,
        interpolation=cfg.get("interpolation", "bilinear"), mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]), crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"))


# --- loaders ---------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """A DistributedSampler (its order depends only on ``seed + epoch``, for one process
    or N) that can start part-way through an epoch, after a resume. Each index travels
    as ``(index, epoch, worker_seed)`` so that ``_EpochItems`` knows the epoch."""

    skip = 0  # samples a resumed epoch skips; both set by ``start_epoch``
    worker_seed = 0

    def __iter__(self):
        tag = (self.epoch, self.worker_seed)
        return ((i, *tag) for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


class _EpochItems(Dataset):
    """A training dataset indexed by ``(index, epoch, worker_seed)``: an image folder
    draws this epoch's replacements, and a worker kept alive across epochs
    (``persistent_workers``) reseeds its RNGs exactly as torch seeds a new worker
    (``_utils.worker._worker_loop``), so augmentation and a resumed run match a loader
    whose workers restart every epoch."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self._worker_seed = dataset, seed, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch, worker_seed = item
        if isinstance(self.dataset, ImageFolderDataset):
            self.dataset.seed, self.dataset.epoch = self.seed, epoch
        info = get_worker_info()
        if info is not None and worker_seed != self._worker_seed:
            self._worker_seed = worker_seed
            random.seed(worker_seed + info.id)
            torch.manual_seed(worker_seed + info.id)
            np.random.seed(_generate_state(worker_seed, info.id))
        return self.dataset[index]


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the main process, which saves a resumable
    state and then shuts them down (a worker killed by the signal would crash the main
    process first). Forked workers inherit the handler anyway; spawned ones (macOS,
    Python 3.14's forkserver) do not."""
    from .faults import STOP_SIGNALS

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, *, training: bool, seed: int = 0,
                workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """A loader over this rank's share. ``batch_size`` is per rank.

    Training: shuffled by ``seed + epoch`` (call ``start_epoch``), last partial batch
    dropped so every step has the same global batch; worker processes live for the
    loader's life, not one epoch. Evaluation: the readable images only (a duplicate
    would bias the metrics), a plain strided shard per rank with no padding, so summed
    metrics are exact; ``evaluate`` puts the ranks' rows back in order.
    """
    common = dict(num_workers=workers, pin_memory=pin_memory,
                  worker_init_fn=_worker_init if workers else None)
    if training:
        items = _EpochItems(dataset, seed)
        sampler = ResumableSampler(items, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=seed, drop_last=True)
        # Its own generator: creating an iterator never draws from the global RNG, and
        # worker seeds depend only on (seed, epoch); see ``start_epoch``.
        return DataLoader(items, batch_size=batch_size, sampler=sampler, drop_last=True,
                          generator=torch.Generator().manual_seed(seed),
                          persistent_workers=workers > 0, **common)
    if isinstance(dataset, ImageFolderDataset):
        dataset = Subset(dataset, dataset.readable_indices)
    if world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Set the epoch's order, and skip the batches a resumed run has already done.

    Worker seeds depend only on (seed, epoch): torch draws a new iterator's base seed
    from ``loader.generator``; the same draw, made here, reseeds persistent workers."""
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    sampler.skip = skip_batches * loader.batch_size
    loader.generator.manual_seed(sampler.seed * 100_003 + epoch)
    same = torch.Generator().manual_seed(sampler.seed * 100_003 + epoch)
    sampler.worker_seed = int(torch.empty((), dtype=torch.int64).random_(generator=same).item())
