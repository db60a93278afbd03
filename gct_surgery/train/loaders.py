"""Loaders over a split: timm's data config and transforms, a sampler that resumes
mid-epoch, and batches that carry home the bad files they skipped.

The count works with DataLoader worker processes: every sample carries the bad files
it replaced, the collate function passes them along with the batch, and the loader
(``ReportingLoader``) adds them to a ``DataReport`` in the main process.

Transforms come from ``resolve_data_config`` and ``create_transform``, fed by the
input size and normalisation the checkpoint records. Sampling uses
``DistributedSampler`` in every case (one replica without torchrun): its order depends
only on ``seed + epoch``, so a resumed run, a single process and N torchrun processes
all see the same global batches.
"""
from __future__ import annotations

import itertools
import logging
import signal
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import DataError
from ..io.sources import fit_channels
from .config import COLOR_JITTER, CROP_SCALE, HFLIP
from .faults import STOP_SIGNALS
from .data_report import BAD_SHARE, DataReport, bad_share_line
from .images import ImageFolderDataset, no_readable_image, strict_error

_logger = logging.getLogger(__name__)


# --- transforms ----------------------------------------------------------------------

def resolve_data_config(recorded: dict, model: torch.nn.Module | None = None,
                        img_size: int | None = None) -> dict:
    """timm's data config from what the checkpoint records, with ``img_size`` overriding
    the spatial size (e.g. 32 px for a quick run on small images).

    What neither the record nor a timm model's pretrained config gives is timm's
    ImageNet default; the config then lists it under ``assumed`` and a warning names
    the values, since a user's model may have been normalised otherwise."""
    from timm.data import resolve_data_config as timm_resolve

    args: dict[str, Any] = {k: recorded[k] for k in
                            ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
                            if recorded.get(k) is not None}
    if "input_size" in args:
        args["input_size"] = tuple(args["input_size"])
    if img_size is not None:
        channels = args.get("input_size", (3,))[0]
        args["input_size"] = (channels, img_size, img_size)
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
                        "--interpolation I --crop-pct C` (or save(..., data={...}))", ", ".join(assumed),
                        ", ".join(f"{k} {cfg[k]}" for k in assumed))
    return cfg


def create_transform(cfg: dict, *, training: bool, augment: bool = True,
                     crop_scale: float = CROP_SCALE, hflip: float = HFLIP,
                     color_jitter: float = COLOR_JITTER):
    """timm's train or eval transform for a resolved data config. The train transform
    crops at least ``crop_scale`` of the image, flips with probability ``hflip`` and
    jitters colour by ``color_jitter``: milder than timm's from-scratch defaults
    (0.08, 0.5, 0.4), which suit ImageNet from scratch, not a few fine-tuning epochs."""
    from timm.data import create_transform as timm_transform

    return timm_transform(
        input_size=tuple(cfg["input_size"]), is_training=training, no_aug=not augment,
        scale=(crop_scale, 1.0), hflip=hflip, color_jitter=color_jitter,
        interpolation=cfg.get("interpolation", "bilinear"), mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]), crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"))


# --- loaders -------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch (after a resume).

    Each index travels as ``(index, epoch, worker_seed)``: a persistent worker process
    (started once per stage) learns from it that a new epoch began, and reseeds itself
    as a freshly started worker would have been (``_Reported.enter_epoch``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0
        self.worker_seed = 0  # set by ``start_epoch``

    def __iter__(self):
        tag = (self.epoch, self.worker_seed)
        return ((i, *tag) for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


class _Reported(Dataset):
    """Items ``(sample, skipped, found, index)``: what ``ImageFolderDataset.load`` gives,
    and for any other dataset (a ``--task``'s) the sample with nothing skipped; ``index``
    is the sample's place in the dataset (evaluation's per-image results keep its order).

    Training replaces a bad sample by a readable one of its class, drawn from ``seed``,
    ``epoch`` and the index (every batch keeps its size, so every rank and a resumed
    run step alike); evaluation drops it (a duplicate would bias the metrics)."""

    def __init__(self, dataset: Dataset, indices: range | None = None, *, replace: bool = True,
                 seed: int = 0) -> None:
        self.dataset = dataset
        self.indices = indices
        self.replace = replace
        self.seed = seed
        self.epoch = 0  # training: from the sampler's keys, see ``enter_epoch``
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def enter_epoch(self, epoch: int, worker_seed: int) -> None:
        """Replacements of bad samples are drawn per epoch; and a worker process kept
        alive across epochs (``persistent_workers``) reseeds its RNGs exactly as torch
        seeds a new worker (``_utils.worker._worker_loop``), so augmentation, the data
        order and a resumed run match a loader whose workers restart every epoch."""
        self.epoch = epoch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None or worker_seed == self._worker_seed:
            return
        self._worker_seed = worker_seed
        import random

        import numpy as np
        from torch.utils.data._utils.worker import _generate_state

        random.seed(worker_seed + info.id)
        torch.manual_seed(worker_seed + info.id)
        np.random.seed(_generate_state(worker_seed, info.id))

    def __getitem__(self, i):
        if isinstance(i, tuple):  # training: (index, epoch, worker seed), see ResumableSampler
            i, epoch, worker_seed = i
            self.enter_epoch(epoch, worker_seed)
        j = self.indices[i] if self.indices is not None else i
        if isinstance(self.dataset, ImageFolderDataset):
            return *self.dataset.load(j, replace=self.replace, epoch=self.epoch, seed=self.seed), j
        return self.dataset[j], [], [], j


def collate_reported(items: list) -> tuple[Any, list, list, list]:
    """torch's default collate of the samples, and the bad files and the kept samples'
    dataset indices, passed alongside (this runs in the worker process; the batch carries
    the count home)."""
    from torch.utils.data import default_collate

    skipped = [s for _, sk, _, _ in items for s in sk]
    found = [f for _, _, fd, _ in items for f in fd]
    kept = [(sample, j) for sample, _, _, j in items if sample is not None]
    batch = default_collate([sample for sample, _ in kept]) if kept else None
    return batch, skipped, found, [j for _, j in kept]


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the main process, which saves a resumable
    state and then shuts them down. Ctrl-C and preemption reach the whole process
    group, and a worker killed by the signal crashes the main process ("DataLoader
    worker ... exited unexpectedly") before it can save. Forked workers (Linux's
    default) inherit the main process's handler anyway; spawned and forkserver ones
    (macOS, Python 3.14) do not, and are covered from here on. A forked worker also
    closes its copy of the run folder's lock (``lock.close_inherited``)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    from .lock import close_inherited

    close_inherited()


class ReportingLoader(DataLoader):
    """A DataLoader whose batches arrive with the bad files they skipped: it yields the
    batch alone, counts the files into ``report`` and, under ``strict``, raises at the
    first one. ``on_bad(path, reason)`` hears of each new bad file. A class with more
    than ``BAD_SHARE`` of its files unreadable is warned about once (and recorded in
    the report)."""

    def __init__(self, *args, report: DataReport | None = None, strict: bool = False,
                 on_bad: Callable[[str, str], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.report = report if report is not None else DataReport()
        self.strict = strict
        self.on_bad = on_bad
        self._synced = -1
        self.batch_indices: list[int] = []
        self._bad_per_class: dict[int, int] = {}

    def _images(self) -> ImageFolderDataset | None:
        ds = getattr(self.dataset, "dataset", None)
        return ds if isinstance(ds, ImageFolderDataset) else None

    def _sync(self) -> None:
        """Before the workers start: the bad files known so far are never decoded again,
        and the per-class index is built once here, not in every worker."""
        ds = self._images()
        if ds is None or len(self.report.bad) == self._synced:
            return
        self._synced = len(self.report.bad)
        ds.remember(self.report.bad)
        self._bad_per_class = ds.bad_per_class()
        if self.dataset.replace:
            ds.by_class()

    def __iter__(self):
        self._sync()
        yielded, tried = False, []
        for batch, skipped, found, indices in super().__iter__():
            if skipped or found:
                if self.strict:
                    raise strict_error(*(skipped or found)[0][:2])
                new = self.report.add_skipped([(p, r) for p, r, _ in skipped])
                new += self.report.add_bad([(p, r) for p, r, _ in found])
                for path, reason in new:
                    _logger.info("skipped %s: %s", path, reason)  # the CLI warns through on_bad
                    if self.on_bad is not None:
                        self.on_bad(path, reason)
                if new:
                    labels = {p: label for p, _, label in skipped + found}
                    self._count_share([labels[p] for p, _ in new])
            if batch is None:
                if self.dataset.replace:  # training: no file of the split is readable
                    raise self._nothing_readable([(p, r) for p, r, _ in skipped + found])
                tried += [(p, r) for p, r, _ in skipped]
                continue
            yielded = True
            self.batch_indices = indices  # the dataset indices of the batch being yielded
            yield batch
        if tried and not yielded:
            raise self._nothing_readable(tried)

    def _count_share(self, labels: list[int]) -> None:
        """Warn once for a class whose unreadable share passes ``BAD_SHARE``."""
        ds = self._images()
        if ds is None:
            return
        for label in labels:
            self._bad_per_class[label] = bad = self._bad_per_class.get(label, 0) + 1
            total = len(ds.by_class().get(label, ()))
            name = ds.classes[label] if label < len(ds.classes) else str(label)
            if total and bad > BAD_SHARE * total:
                if name not in self.report.bad_share:
                    _logger.warning("%s", bad_share_line(name, bad, total))
                self.report.bad_share[name] = [max(bad, self.report.bad_share.get(name, [0])[0]), total]

    def _nothing_readable(self, skipped: list[tuple[str, str]]) -> DataError:
        reader = getattr(self.dataset.dataset, "reader", None)
        return no_readable_image(getattr(reader, "root", "the split"), skipped)


def make_loader(dataset: Dataset, batch_size: int, *, training: bool, seed: int = 0,
                workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, report: DataReport | None = None,
                strict: bool = False, on_bad: Callable[[str, str], None] | None = None) -> ReportingLoader:
    """A loader over this rank's share. ``batch_size`` is per rank.

    Training: shuffled by ``seed + epoch`` (call ``start_epoch``), last partial batch
    dropped so every step has the same global batch; worker processes (``workers``
    > 0; ``machine.choose`` picks how many) live for the loader's life, not one epoch,
    so their start-up is paid once per stage. Evaluation: a
    plain strided shard per rank with no padding, so summed metrics are exact. Bad
    files are counted into ``report`` (or fail the run under ``strict``).
    """
    common = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=collate_reported,
                  worker_init_fn=_worker_init if workers else None, report=report,
                  strict=strict, on_bad=on_bad)
    if training:
        items = _Reported(dataset, seed=seed)
        sampler = ResumableSampler(items, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=seed, drop_last=True)
        # Its own generator: creating an iterator never draws from the global RNG, and
        # worker seeds depend only on (seed, epoch); see ``start_epoch``.
        return ReportingLoader(items, batch_size=batch_size, sampler=sampler, drop_last=True,
                               generator=torch.Generator().manual_seed(seed),
                               persistent_workers=workers > 0, **common)
    shard = None if world_size == 1 else range(rank, len(dataset), world_size)
    return ReportingLoader(_Reported(dataset, shard, replace=False), batch_size=batch_size,
                           shuffle=False, **common)


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
