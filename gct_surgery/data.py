"""Image-classification folders, read with timm's dataset and transforms.

The layout is the one timm and torchvision read::

    DIR/train/<class>/*.png|jpg|...
    DIR/val/<class>/*          (or DIR/validation/<class>/*)

Datasets are timm's ``ImageDataset``: it opens every image as RGB (grayscale files
work) and skips a file that fails to decode with a warning instead of crashing the
epoch. ``ImageFolderDataset`` is the place to harden that further (counting and
reporting bad files). Transforms come from ``resolve_data_config`` and
``create_transform``, fed by the input size and normalisation the checkpoint records.

Sampling uses ``DistributedSampler`` in every case (one replica without torchrun):
its order depends only on ``seed + epoch``, so a resumed run, a single process and N
torchrun processes all see the same global batches.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .errors import DataError

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


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


class ImageFolderDataset(ImageDataset):
    """timm's ImageDataset over ``split/<class>/*``, with the class list exposed.

    Bad files are skipped by timm's ``__getitem__`` (up to TIMM_DATASET_MAX_RETRIES in
    a row, each with a warning); override ``__getitem__`` here to count or report them.
    """

    @property
    def class_to_idx(self) -> dict[str, int]:
        return dict(self.reader.class_to_idx)

    @property
    def classes(self) -> list[str]:
        return [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.reader.samples]


def open_split(root: str | Path, split: str, *, transform=None,
               class_to_idx: dict[str, int] | None = None) -> Dataset:
    """One split as a dataset. ``class_to_idx`` (from the train split) keeps labels
    consistent across splits; a class folder it does not know is an error."""
    folder = split_dir(root, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders: put images in {folder}/<class>/")
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(f"{folder} has classes the train split lacks: {', '.join(unknown[:5])}")
    try:
        return ImageFolderDataset(str(folder), class_map=dict(class_to_idx) if class_to_idx else None,
                                transform=transform)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise DataError(f"{folder}: {e}") from None


def resolve_data_config(recorded: dict, model: torch.nn.Module | None = None,
                        img_size: int | None = None) -> dict:
    """timm's data config from what the checkpoint records, with ``img_size`` overriding
    the spatial size (e.g. 32 px for a quick run on small images)."""
    from timm.data import resolve_data_config as timm_resolve

    args: dict[str, Any] = {k: recorded[k] for k in
                            ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
                            if recorded.get(k) is not None}
    if "input_size" in args:
        args["input_size"] = tuple(args["input_size"])
    if img_size is not None:
        channels = args.get("input_size", (3,))[0]
        args["input_size"] = (channels, img_size, img_size)
    cfg = timm_resolve(args, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def create_transform(cfg: dict, *, training: bool, augment: bool = True):
    """timm's train or eval transform for a resolved data config."""
    from timm.data import create_transform as timm_transform

    return timm_transform(
        input_size=tuple(cfg["input_size"]), is_training=training, no_aug=not augment,
        interpolation=cfg.get("interpolation", "bilinear"), mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]), crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"))


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch (after a resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


def make_loader(dataset: Dataset, batch_size: int, *, training: bool, seed: int = 0,
                workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """A loader over this rank's share. ``batch_size`` is per rank.

    Training: shuffled by ``seed + epoch`` (call ``loader.sampler.set_epoch``), last
    partial batch dropped so every step has the same global batch. Evaluation: a
    plain strided shard per rank with no padding, so summed metrics are exact.
    """
    if training:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=seed, drop_last=True)
        # Its own generator: creating an iterator never draws from the global RNG, and
        # worker seeds depend only on (seed, epoch); see ``start_epoch``.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                          num_workers=workers, pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(seed))
    shard = dataset if world_size == 1 else torch.utils.data.Subset(
        dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory)


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Set the epoch's order, and skip the batches a resumed run has already done."""
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    sampler.skip = skip_batches * loader.batch_size
    loader.generator.manual_seed(sampler.seed * 100_003 + epoch)
