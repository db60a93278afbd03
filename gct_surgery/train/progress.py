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
from .data_report import DataReport
from .distributed import Dist
from .faults import NonFiniteLossError, RunError, nonfinite_weight, note_saved, writing

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
    step_in_epoch: int = 0         # completed steps of that epoch (a step: one update, of
                                   # grad_accum loader micro-batches; world.count_steps)
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
    note_saved(run_dir, f"stage {stage_name!r} with {progress.epoch} epoch(s) and "
                        f"{progress.step_in_epoch} step(s) done")


def _plain(d: dict) -> dict:
    """Drop scheduler fields that are not plain data (weights_only must read it back)."""
    ok = (int, float, str, bool, type(None), list, tuple, dict, torch.Tensor)
    return {k: v for k, v in d.items() if isinstance(v, ok)}


def read_state(run_dir: Path) -> dict:
    """The train state of ``run_dir``, read safely and validated like a checkpoint header
    (``check_state``); a ``RunError`` when there is none or it is damaged."""
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
    check_state(state, path)
    return state


_COUNTS = ("stage_index", "epoch", "step_in_epoch", "stage_step", "trainable_max",
           "nonfinite_skipped", "global_step", "val_samples")
_JSON = {"rows": list, "best": (dict, type(None)), "stages": list, "data_report": dict}
_TENSOR_DICTS = ("model", "ema")
_DICTS = ("optimizer", "scheduler", "scaler", "rng")
_FLOATS = ("last_lr", "last_base_lr")
STATE_KEYS = frozenset({"version", "meta", "epoch_sums", *_COUNTS, *_JSON, *_TENSOR_DICTS,
                        *_DICTS, *_FLOATS})
_OPTIONAL = frozenset({"last_lr", "last_base_lr", "nonfinite_skipped", "data_report",
                       "global_step", "stages", "val_samples"})


def damaged(path: Path, what: str) -> RunError:
    return RunError(f"{path} is damaged or was edited ({what}), so the run cannot resume from "
                    "it; start the run again with a new --out (or restore the folder from a copy)")


def check_state(state: dict, path: Path) -> None:
    """Every value a resume reads, checked for its type and range before it is used: a
    truncated, edited or hostile ``state.pt`` is one line, never a traceback or a run
    that silently trains the wrong amount."""
    unknown = sorted(str(k) for k in state if k not in STATE_KEYS)
    if unknown:
        raise damaged(path, f"unknown field {unknown[0]!r}")
    missing = sorted(k for k in STATE_KEYS - _OPTIONAL if k not in state)
    if missing:
        raise damaged(path, f"no {missing[0]!r}")
    if not isinstance(state["meta"], str):
        raise damaged(path, "meta is not a JSON document")
    for key in _COUNTS:
        v = state.get(key, 0)
        if type(v) is not int or v < 0:
            raise damaged(path, f"{key} is {_show(v)}, not a count of 0 or more")
    for key in _FLOATS:
        if key in state and type(state[key]) not in (float, int):
            raise damaged(path, f"{key} is {_show(state[key])}, not a number")
    sums = state["epoch_sums"]
    if (not isinstance(sums, (list, tuple)) or len(sums) != 3
            or not all(type(v) in (float, int) and v >= 0 for v in sums)):
        raise damaged(path, f"epoch_sums is {_show(sums)}, not three numbers of 0 or more")
    for key, kind in _JSON.items():
        if key not in state:
            continue
        try:
            value = json.loads(state[key]) if isinstance(state[key], str) else None
        except ValueError:
            value = None
        if not isinstance(value, kind):
            raise damaged(path, f"{key} is not the JSON it should be")
    rows = json.loads(state["rows"])
    if not rows or not all(isinstance(r, dict) and type(r.get("epoch")) is int and isinstance(r.get("stage"), str)
                           for r in rows):
        raise damaged(path, "rows are not metrics rows")
    for key in _TENSOR_DICTS:
        d = state[key]
        if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in d.items()):
            raise damaged(path, f"{key} is not a mapping of names to tensors")
    for key in _DICTS:
        if not isinstance(state[key], dict):
            raise damaged(path, f"{key} is not a mapping")
    if state["optimizer"] and not {"state", "param_groups"} <= set(state["optimizer"]):
        raise damaged(path, "optimizer is not an optimizer state")
    try:
        DataReport.from_state(json.loads(state.get("data_report", "{}")))
        check_rng(state["rng"])
    except (ValueError, TypeError) as e:
        raise damaged(path, str(e)) from None


def _show(v: Any) -> str:
    return f"{v!r}"[:40] if not isinstance(v, torch.Tensor) else f"a tensor of shape {tuple(v.shape)}"


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


def check_rng(state: dict) -> None:
    """The RNG states ``rng_state`` saved, by type and size (a ``ValueError`` if not)."""
    ok_torch = (isinstance(state.get("torch"), torch.Tensor) and state["torch"].dtype == torch.uint8
                and state["torch"].shape == torch.get_rng_state().shape)
    py = state.get("python")
    ok_python = (isinstance(py, (list, tuple)) and len(py) == 3 and type(py[0]) is int
                 and isinstance(py[1], (list, tuple)) and len(py[1]) == 625
                 and all(type(v) is int and 0 <= v < 2**32 for v in py[1])
                 and (py[2] is None or type(py[2]) is float))
    npy = state.get("numpy")
    ok_numpy = (isinstance(npy, (list, tuple)) and len(npy) == 5 and npy[0] == "MT19937"
                and isinstance(npy[1], torch.Tensor) and tuple(npy[1].shape) == (624,)
                and type(npy[2]) is int and 0 <= npy[2] <= 624 and type(npy[3]) is int
                and type(npy[4]) in (float, int))
    cuda = state.get("cuda", [])
    ok_cuda = isinstance(cuda, (list, tuple)) and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    for name, ok in (("torch", ok_torch), ("python", ok_python), ("numpy", ok_numpy), ("cuda", ok_cuda)):
        if not ok:
            raise ValueError(f"the {name} random state is malformed")


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
