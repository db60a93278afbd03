"""Where a run stands (``Progress``), and the train state ``state.pt`` that lets a killed
run resume bit for bit.

The train state is a plain dict of tensors, numbers and JSON strings: the model,
optimizer, scheduler, scaler and EMA state, every RNG, and ``Progress.to_state()``.
It is written atomically and read with ``weights_only=True``, so a hostile file
cannot run code.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.atomic import atomic_path
from .distributed import Dist
from .faults import NonFiniteLossError, RunError, nonfinite_weight, writing

STATE_FILE = "state.pt"
STATE_VERSION = 1


@dataclass
class EpochSums:
    """The epoch in progress, summed so far: its train loss and speed come from these."""

    loss_sum: float = 0.0  # loss * samples
    samples: float = 0.0
    seconds: float = 0.0


@dataclass
class Progress:
    """Everything about a run's position and history that a resume must restore."""

    stage_index: int = 0
    epoch: int = 0                 # within the stage: the epoch in progress
    step_in_epoch: int = 0         # completed steps of that epoch
    stage_step: int = 0            # completed updates in the stage (the scheduler's clock)
    epoch_sums: EpochSums = field(default_factory=EpochSums)
    rows: list[dict] = field(default_factory=list)  # one per completed epoch, as in metrics.csv
    best: dict | None = None       # the row with the best primary metric
    trainable_max: int = 0
    last_lr: float = float("nan")  # the gates' lr in the latest update
    last_base_lr: float = float("nan")  # the base weights' lr in the latest update
    nonfinite_skipped: int = 0     # batches skipped for a non-finite loss (whole run)
    data_report: Any = None        # images.DataReport: bad files skipped, files ignored
    global_step: int = 0           # updates over the whole run (the EMA's clock)
    stages: list[dict] = field(default_factory=list)  # one summary per finished stage
    val_samples: int = 0           # validation samples a row is measured on

    def add_row(self, row: dict, primary_metric: str, higher_is_better: bool, *,
                eligible: bool = True) -> bool:
        """Record a row; True when it is the new best. Row 0 (before training) is not
        ``eligible``: best.safetensors is always a trained model."""
        self.rows.append(row)
        if not eligible:
            return False
        if self.best is not None:
            a, b = row[primary_metric], self.best[primary_metric]
            if not (a > b if higher_is_better else a < b):
                return False
        self.best = row
        return True

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = EpochSums()

    def finish_stage(self) -> None:
        self.stage_index += 1
        self.epoch = self.step_in_epoch = self.stage_step = 0

    def to_state(self) -> dict:
        """Plain data for ``state.pt`` (rows, best and the report as JSON strings)."""
        sums = self.epoch_sums
        report = self.data_report.to_state() if self.data_report is not None else {}
        return {"stage_index": self.stage_index, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "stage_step": self.stage_step,
                "epoch_sums": [sums.loss_sum, sums.samples, sums.seconds],
                "rows": json.dumps(self.rows), "best": json.dumps(self.best),
                "trainable_max": self.trainable_max, "last_lr": self.last_lr,
                "last_base_lr": self.last_base_lr,
                "data_report": json.dumps(report), "nonfinite_skipped": self.nonfinite_skipped,
                "global_step": self.global_step, "stages": json.dumps(self.stages),
                "val_samples": self.val_samples}

    @classmethod
    def from_state(cls, state: dict, data_report: Any) -> "Progress":
        """The progress ``state`` saved; ``data_report`` (what this process has counted
        so far, a ``data.DataReport``) is merged into the saved report."""
        if state.get("data_report"):
            from .images import DataReport

            data_report = DataReport.from_state(json.loads(state["data_report"])).merge(data_report)
        loss_sum, samples, seconds = (float(v) for v in state["epoch_sums"])
        return cls(stage_index=int(state["stage_index"]), epoch=int(state["epoch"]),
                   step_in_epoch=int(state["step_in_epoch"]), stage_step=int(state["stage_step"]),
                   epoch_sums=EpochSums(loss_sum, samples, seconds),
                   rows=json.loads(state["rows"]), best=json.loads(state["best"]),
                   trainable_max=int(state["trainable_max"]),
                   last_lr=float(state.get("last_lr", float("nan"))),
                   last_base_lr=float(state.get("last_base_lr", float("nan"))),
                   nonfinite_skipped=int(state.get("nonfinite_skipped", 0)),
                   data_report=data_report, global_step=int(state.get("global_step", 0)),
                   stages=json.loads(state.get("stages", "[]")),
                   val_samples=int(state.get("val_samples", 0)))


def scan_data_report(*datasets) -> Any:
    """What the data folders held besides good images (an empty report for a --task's
    own datasets)."""
    from .images import DataReport

    report = DataReport()
    for ds in datasets:
        if isinstance(getattr(ds, "report", None), DataReport):
            report.merge(ds.report)
    return report


def gather_data_report(report: Any, ctx: Dist) -> Any:
    """Under torchrun each rank counted the bad files of its own share: merge them."""
    if not ctx.enabled:
        return report
    import torch.distributed as dist

    from .images import DataReport

    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, report.to_state())
    merged = DataReport()
    for part in parts:
        merged.merge(DataReport.from_state(part))
    return merged


# --- state.pt -----------------------------------------------------------------------

def write_state(run_dir: Path, progress: Progress, stage_name: str, *, meta_json: str,
                model: nn.Module, optimizer, scheduler, scaler, ema_model: nn.Module | None,
                hint: str = "") -> None:
    """Everything ``resume`` needs, written atomically (a failed write keeps the old one).
    Never with non-finite weights: a state that cannot train on is not a resumable one."""
    bad = nonfinite_weight(model)
    if bad is not None:
        raise NonFiniteLossError(
            f"the weights became non-finite (first: {bad}) by step {progress.step_in_epoch} of "
            f"epoch {progress.epoch + 1} of stage {stage_name!r}; the state was not saved, so "
            f"{run_dir} holds the last good one. Lower the learning rate")
    state = {
        "version": STATE_VERSION,
        "meta": meta_json,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": _plain(scheduler.state_dict()) if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": ({k: v.detach().cpu() for k, v in ema_model.state_dict().items()}
                if ema_model is not None else {}),
        "rng": rng_state(),
        **progress.to_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(run_dir) / STATE_FILE
    with writing(path, hint), atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _plain(d: dict) -> dict:
    """Drop scheduler fields that are not plain data (weights_only must read it back)."""
    ok = (int, float, str, bool, type(None), list, tuple, dict, torch.Tensor)
    return {k: v for k, v in d.items() if isinstance(v, ok)}


def read_state(run_dir: Path) -> dict:
    """The train state of ``run_dir``, read safely; a ``RunError`` when there is none."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} has no {STATE_FILE}: nothing to resume (is it a run folder?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or hostile file
        raise RunError(f"{path} is not a readable train state ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RunError(f"{path} is not a gct-surgery train state of version {STATE_VERSION}")
    return state


# --- random number generators -------------------------------------------------------

def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG as plain types and tensors (loadable with weights_only=True)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
