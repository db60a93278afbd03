"""The dense tasks built in: ``--task saliency`` (one foreground probability per pixel,
U^2-Net style) and ``--task segmentation`` (one class per pixel, torchvision style).

Both read ``DATA/{train,val}/images/*`` beside ``DATA/{train,val}/masks/<stem>.png``.
Image and mask are augmented together (torchvision's v2 transforms resize a ``Mask``
with nearest interpolation); validation keeps each mask at its own size, padded with
"ignore" so a batch stacks, and every metric is computed at that size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .data import DataReport, read_image, unreadable_files
from .layouts import IMAGE_EXTENSIONS

IGNORE = 255  # a segmentation mask's "no label" (VOC's object borders)
BETA2 = 0.3  # the F-measure's beta^2 in salient object detection
THRESHOLDS = 256  # a saliency map binarised at 0..255
EPS = 2.220446049250313e-16  # MATLAB's eps, as the S-measure's reference code adds it


def mask_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """Each image of ``split_dir/images`` with the mask of the same stem in
    ``split_dir/masks``; an image without a mask, or a mask without an image, is an error
    that names it."""
    images, masks = split_dir / "images", split_dir / "masks"
    for folder in (images, masks):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; a dense task reads "
                            "DATA/{train,val}/images/* and DATA/{train,val}/masks/*.png")
    image_of = _by_stem(p for p in images.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
    mask_of = _by_stem(p for p in masks.iterdir() if p.suffix.lower() == ".png")
    if not mask_of:
        raise UserError(f"{masks}: no .png masks; put one mask per image there (same stem)")
    for stem in sorted(image_of.keys() - mask_of.keys()):
        raise UserError(f"{image_of[stem]}: no mask {masks / stem}.png; "
                        "add it or move the image out")
    for stem in sorted(mask_of.keys() - image_of.keys()):
        raise UserError(f"{mask_of[stem]}: no image of this name in {images}; remove the mask")
    return [(image_of[s], mask_of[s]) for s in sorted(image_of)]


def readable_pairs(split_dir: Path) -> tuple[list[tuple[Path, Path]], DataReport]:
    """``mask_pairs`` without the pairs whose image or mask cannot be decoded: each such
    file is in the report (skipped and counted, as bad images are; ``--strict`` stops)."""
    pairs = mask_pairs(split_dir)
    report = DataReport(bad=unreadable_files([str(f) for pair in pairs for f in pair]))
    good = [(i, m) for i, m in pairs if str(i) not in report.bad and str(m) not in report.bad]
    if not good:
        path, why = next(iter(report.bad.items()))
        raise UserError(f"no image and mask of {split_dir} can be read ({len(pairs)} tried), "
                        f"e.g. {path}: {why}")
    return good, report


def _refuse_binary_masks(split_dir: Path, masks: list[Path]) -> None:
    """Segmentation masks holding only 0 and 255 are binary masks saved as grey levels:
    255 means "ignore", so no pixel would be foreground."""
    values: set[int] = set()
    for mask in masks:
        with Image.open(mask) as m:
            values.update(int(v) for v in np.unique(np.asarray(m)))
        if values - {0, IGNORE}:
            return
    if IGNORE in values:
        raise UserError(f"the masks of {split_dir} hold only 0 and 255, and for --task "
                        "segmentation 255 means 'ignore' (no pixel would be foreground): "
                        "save the object as class 1, or use --task saliency for 0-255 masks")


def _by_stem(paths) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(paths):
        if p.stem in found:
            raise UserError(f"{p}: {found[p.stem].name} has the same name; keep one of them")
        found[p.stem] = p
    return found


class MaskFolder(Dataset):
    """(image, {"mask", "size"}) pairs of one split. ``labels``: the mask holds class
    indices (segmentation), else grey levels mapped to [0, 1] (saliency)."""

    def __init__(self, split_dir: Path, data_config: dict, *, labels: bool, augment: bool) -> None:
        from torchvision.transforms import v2

        self.pairs, self.report = readable_pairs(split_dir)
        self.labels, self.augment = labels, augment
        if labels:
            _refuse_binary_masks(split_dir, [mask for _, mask in self.pairs])
        channels, height, width = data_config["input_size"]
        self.channels = channels
        sizes = []
        for image, mask in self.pairs:
            with Image.open(image) as a, Image.open(mask) as b:  # headers only
                if a.size != b.size:
                    raise UserError(f"{mask}: the mask is {b.size[0]}x{b.size[1]} and its image "
                                    f"{a.size[0]}x{a.size[1]}; give every mask its image's size")
                sizes.append(b.size[::-1])
        self.sizes = sizes
        self.pad_to = tuple(max(s[i] for s in sizes) for i in (0, 1))
        resize = v2.Resize((height, width), antialias=True)
        steps = [resize, v2.RandomHorizontalFlip()] if augment else [resize]
        self.transform = v2.Compose(steps)
        self.normalize = v2.Normalize(list(data_config["mean"]), list(data_config["std"]))

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, index: int) -> np.ndarray:
        """The mask as stored: class indices (a palette PNG's indices, not its colours)
        or grey levels 0-255."""
        with Image.open(self.pairs[index][1]) as m:
            if not self.labels and m.mode != "L":  # grey levels, whatever the PNG's mode
                m = m.convert("L")
            array = np.array(m)
        if array.ndim != 2:
            raise UserError(f"{self.pairs[index][1]}: the mask has {array.shape[2]} channels; "
                            "a mask is one channel of class indices (or grey levels)")
        return array

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        image = tv_tensors.Image(pil_to_tensor(read_image(self.pairs[index][0], self.channels)))
        mask = torch.from_numpy(self.read_mask(index).astype(np.int64))[None]
        if self.augment:
            image, mask = self.transform(image, tv_tensors.Mask(mask))
        else:  # the mask keeps its own size, padded to stack: metrics are taken there
            image = self.transform(image)
            grow = (0, self.pad_to[1] - mask.shape[2], 0, self.pad_to[0] - mask.shape[1])
            mask = F.pad(mask, grow, value=IGNORE if self.labels else -255)
        size = torch.tensor(self.sizes[index] if not self.augment else mask.shape[-2:])
        mask = mask[0] if self.labels else mask[0].float() / 255.0  # padding: -1, "no pixel"
        image = self.normalize(image.float() / 255.0)
        target = {"mask": mask.as_subclass(torch.Tensor), "size": size}
        return image.as_subclass(torch.Tensor), target


def _crops(output: torch.Tensor, target: dict):
    """Each image's output resized to its mask's own size, with that mask."""
    for i, (h, w) in enumerate(target["size"].tolist()):
        out = output[i:i + 1].float()
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        yield out[0], target["mask"][i, :h, :w]


class _DenseTask:
    """What both dense tasks share: the mask folders, and a sample count per batch."""

    labels = False

    def datasets(self, data_dir: Path, data_config: dict, *, augment: bool):
        return tuple(self.open_split(data_dir, data_config, name,
                                     augment=augment and name == "train")
                     for name in ("train", "val"))

    def open_split(self, data_dir: Path, data_config: dict, name: str, *, augment: bool = False):
        """One split's mask folder: ``eval`` opens (and decodes) only the one it scores."""
        folder = MaskFolder(Path(data_dir) / name, data_config, labels=self.labels, augment=augment)
        self.data = [*getattr(self, "data", []), folder]  # where a bad class index is looked for
        return folder

    def batch_size(self, target: dict) -> int:
        return len(target["size"])


class SaliencyTask(_DenseTask):
    """Salient object detection: BCE (plus IoU loss with ``iou_loss``) on every output of
    a model that returns one map or a tuple of side outputs (the first is the fused one,
    as in U^2-Net); MAE and max F-measure on the fused one. ``outputs`` says whether the
    model ends in a sigmoid ("probabilities") or not ("logits"): it is never guessed."""

    metric_names = ("mae", "max_f", "s_measure")
    primary_metric = "mae"
    higher_is_better = False

    def __init__(self, outputs: str, iou_loss: bool = False) -> None:
        if outputs not in ("probabilities", "logits"):
            raise UserError("--task saliency needs --outputs probabilities (a model that ends "
                            "in a sigmoid, like U^2-Net) or --outputs logits")
        self.outputs, self.iou_loss = outputs, iou_loss

    def maps(self, output: Any) -> list[torch.Tensor]:
        """Every output as (N, 1, H, W) probabilities, the fused one first."""
        outs = list(output) if isinstance(output, (tuple, list)) else [output]
        maps = []
        for out in outs:
            if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4) or (
                    out.ndim == 4 and out.shape[1] != 1):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"the model's output is {shape}: --task saliency needs "
                                "(N, 1, H, W) maps, or a tuple of them")
            out = out.float() if out.ndim == 4 else out.float()[:, None]
            if self.outputs == "logits":
                out = torch.sigmoid(out)
            elif out.min() < 0 or out.max() > 1:
                raise UserError("the model's output has values outside [0, 1], so it gives "
                                "logits; pass --outputs logits")
            maps.append(out)
        return maps

    def loss(self, output: Any, target: dict) -> torch.Tensor:
        total = 0.0
        for fused in self.maps(output):
            for p, m in _crops(fused, target):
                keep = m >= 0
                p, m = p[0][keep], m[keep]
                with torch.autocast(p.device.type, enabled=False):  # BCE refuses half inputs
                    loss = F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), m)
                if self.iou_loss:
                    loss = loss + 1 - (p * m).sum() / (p + m - p * m).sum().clamp_min(1e-7)
                total = total + loss
        return total / len(target["size"])

    def per_image(self, output: Any, target: dict) -> torch.Tensor:
        """Each image's MAE: their mean is the dataset's MAE, what the verdict pairs."""
        return torch.stack([(p[0] - m).abs()[m >= 0].mean().double()
                            for p, m in _crops(self.maps(output)[0], target)])

    def metric_sums(self, output: Any, target: dict) -> dict:
        mae, s, curves = 0.0, 0.0, torch.zeros(2, THRESHOLDS, dtype=torch.float64)
        for p, m in _crops(self.maps(output)[0], target):  # one pass over the fused map
            s += s_measure(p[0], m)
            p, m = p[0][m >= 0], m[m >= 0]
            mae += (p - m).abs().mean().item()
            curves += torch.stack(precision_recall(p, m))
        return {"mae": mae, "max_f": curves, "s_measure": s}

    def finish(self, totals: dict, samples: int) -> dict:
        """Dataset-level metrics from the summed totals: the mean precision and recall
        curves over images give one F-measure per threshold; max F is their maximum."""
        precision, recall = (totals["max_f"] / max(samples, 1)).unbind(0)
        f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall).clamp_min(1e-12)
        return {"mae": float(totals["mae"]) / max(samples, 1), "max_f": f.max().item(),
                "s_measure": float(totals["s_measure"]) / max(samples, 1)}


def precision_recall(prob: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's precision and recall at thresholds 0..255 (a pixel is predicted
    salient when round(255 p) >= t; the ground truth is mask > 0.5)."""
    level = (prob.double() * 255).round().long().clamp(0, 255).flatten()
    truth = (mask > 0.5).flatten()
    fg = torch.bincount(level[truth], minlength=THRESHOLDS).double()
    bg = torch.bincount(level[~truth], minlength=THRESHOLDS).double()
    hits = fg.flip(0).cumsum(0).flip(0)  # true positives at threshold t: fg pixels >= t
    said = hits + bg.flip(0).cumsum(0).flip(0)
    precision = torch.where(said > 0, hits / said.clamp_min(1), torch.zeros_like(hits))
    recall = hits / truth.sum() if truth.any() else torch.zeros_like(hits)
    return precision.cpu(), recall.cpu()


def s_measure(prob: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> float:
    """One map's structure measure (Fan et al., ICCV 2017), as the authors'
    ``StructureMeasure.m`` computes it: object-aware similarity (foreground and background
    scored by mean and spread) and region-aware similarity (SSIM of the four blocks
    around the ground truth's centroid), averaged. The map is taken as the model gives
    it and the ground truth is mask > 0.5, as for max F (the authors' demo stretches
    each map to [0, 1] first and takes any nonzero mask pixel as object)."""
    prob, truth = prob.double(), (mask > 0.5).double()
    share = truth.mean().item()
    if share in (0.0, 1.0):  # no object, or no background: how close the map is to it
        return prob.mean().item() if share else 1.0 - prob.mean().item()
    objects = (share * _object_score(prob[truth == 1])
               + (1 - share) * _object_score(1 - prob[truth == 0]))
    return max(0.0, alpha * objects + (1 - alpha) * _region_score(prob, truth))


def _object_score(values: torch.Tensor) -> float:
    spread = values.std().item() if values.numel() > 1 else 0.0
    mean = values.mean().item()
    return 2 * mean / (mean ** 2 + 1 + spread + EPS)


def _region_score(prob: torch.Tensor, truth: torch.Tensor) -> float:
    """SSIM of the four blocks split at the centroid (1-based, rounded half up), each
    weighted by its share of the image."""
    rows, cols = (torch.arange(1, n + 1, dtype=torch.float64) for n in truth.shape)
    total = truth.sum()
    y = int(((truth.sum(1) * rows).sum() / total + 0.5).floor())
    x = int(((truth.sum(0) * cols).sum() / total + 0.5).floor())
    score = 0.0
    for block in ((slice(0, y), slice(0, x)), (slice(0, y), slice(x, None)),
                  (slice(y, None), slice(0, x)), (slice(y, None), slice(x, None))):
        p, t = prob[block], truth[block]
        if p.numel():
            score += p.numel() / prob.numel() * _ssim(p, t)
    return score


def _ssim(p: torch.Tensor, t: torch.Tensor) -> float:
    n, mp, mt = p.numel(), p.mean(), t.mean()
    var_p, var_t = ((p - mp) ** 2).sum() / (n - 1 + EPS), ((t - mt) ** 2).sum() / (n - 1 + EPS)
    cov = ((p - mp) * (t - mt)).sum() / (n - 1 + EPS)
    a, b = (4 * mp * mt * cov).item(), ((mp ** 2 + mt ** 2) * (var_p + var_t)).item()
    return a / (b + EPS) if a != 0 else float(b == 0)


class SegmentationTask(_DenseTask):
    """Semantic segmentation: cross-entropy with 255 ignored, torchvision's ``aux`` output
    weighted 0.5 as its reference scripts do; mIoU and pixel accuracy from the
    dataset's confusion counts."""

    labels = True
    metric_names = ("miou", "pixel_acc")
    primary_metric = "miou"
    higher_is_better = True
    aux_weight = 0.5

    def logits(self, output: Any) -> dict[str, torch.Tensor]:
        outs = output if isinstance(output, dict) else {"out": output}
        for name, out in outs.items():
            if not isinstance(out, torch.Tensor) or out.ndim != 4:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"the model's output {name!r} is {shape}: --task segmentation "
                                "needs (N, classes, H, W) logits, or torchvision's dict of them")
        if "out" not in outs:
            raise UserError(f"the model returns {sorted(outs)}: --task segmentation needs 'out'")
        return outs

    def loss(self, output: Any, target: dict) -> torch.Tensor:
        total = 0.0
        for name, out in self.logits(output).items():
            self._check_labels(out.shape[1], target)
            weight = self.aux_weight if name == "aux" else 1.0
            summed = sum(F.cross_entropy(o[None], m[None], ignore_index=IGNORE, reduction="sum")
                         for o, m in _crops(out, target))
            total = total + weight * summed  # a mask of "ignore" only adds nothing
        labelled = int((target["mask"] != IGNORE).sum())  # padding is IGNORE too
        return total / max(labelled, 1)

    def per_image(self, output: Any, target: dict) -> torch.Tensor:
        """(N, 2C): each image's per-class intersections and unions; ``reduce`` gives mIoU."""
        out = self.logits(output)["out"]
        self._check_labels(out.shape[1], target)
        return torch.stack([_inter_union(o.argmax(0), m, out.shape[1])
                            for o, m in _crops(out, target)])

    def reduce(self, rows: np.ndarray) -> float:
        inter, union = np.split(rows.sum(0), 2)
        present = union > 0
        return float(100.0 * (inter[present] / union[present]).mean()) if present.any() else 0.0

    def metric_sums(self, output: Any, target: dict) -> dict:
        rows = self.per_image(output, target)  # per class: intersections, then unions
        correct = rows[:, :rows.shape[1] // 2].sum().item()  # a pixel right is its class's
        pixels = (target["mask"] != IGNORE).sum().item()
        counts = torch.tensor([correct, pixels], dtype=torch.float64)
        return {"miou": rows.sum(0), "pixel_acc": counts}

    def finish(self, totals: dict, samples: int) -> dict:
        correct, pixels = totals["pixel_acc"].tolist()
        return {"miou": self.reduce(totals["miou"].numpy()[None]),
                "pixel_acc": 100.0 * correct / max(pixels, 1)}

    def _check_labels(self, classes: int, target: dict) -> None:
        labels = target["mask"][target["mask"] != IGNORE]
        if labels.numel() and int(labels.max()) >= classes:
            bad = int(labels.max())
            raise UserError(f"{self._mask_with(bad)}: class index {bad} in a mask, and the model "
                            f"gives {classes} classes (0..{classes - 1}, 255 = ignore); pass "
                            f"--num-classes {bad + 1} or fix the mask")

    def _mask_with(self, label: int) -> str:
        """The first mask file that holds ``label`` (looked for only to name it)."""
        for data in getattr(self, "data", ()):
            for i, (_, mask) in enumerate(data.pairs):
                if (data.read_mask(i) == label).any():
                    return str(mask)
        return "a mask"


def _inter_union(pred: torch.Tensor, mask: torch.Tensor, classes: int) -> torch.Tensor:
    keep = mask != IGNORE
    pred, mask = pred[keep], mask[keep]
    inter = torch.bincount(mask[pred == mask], minlength=classes)[:classes]
    area = (torch.bincount(pred, minlength=classes)[:classes]
            + torch.bincount(mask, minlength=classes)[:classes])
    return torch.cat([inter, area - inter]).double().cpu()
