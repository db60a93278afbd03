"""What a fine-tuning run is asked to do (``TrainConfig``) and what it gives back
(``RunResult``). Plain data: no torch, so the CLI can build and print them cheaply."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .distributed import check_given

AMP_MODES = ("off", "bf16", "fp16")
# Fine-tuning augmentation defaults, milder than timm's from-scratch ImageNet setting
# (scale 0.08-1, jitter 0.4); chosen by benchmarks/study_augmentation.py, see
# docs/finetuning.md "Augmentation: why this default".
CROP_SCALE = 0.5
HFLIP = 0.5
COLOR_JITTER = 0.1


@dataclass
class TrainConfig:
    """Hyperparameters shared by every stage (the stages carry their own lr, wd...)."""

    data: str
    out: str
    batch_size: int = 32            # global, over all ranks
    workers: int | None = None     # loader processes; None: auto (distributed.choose)
    threads: int | None = None     # torch intra-op threads; None: auto (distributed.choose)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    amp: str = "off"                # off | bf16 (CPU or CUDA) | fp16 (CUDA)
    num_classes: int | None = None  # replace the head for a data set with another class count
    img_size: int | None = None     # override the checkpoint's input size (square)
    augment: bool = True            # timm's train augmentation (False: resize + center crop)
    crop_scale: float = CROP_SCALE  # random resized crop: smallest area share kept (timm's scratch: 0.08)
    hflip: float = HFLIP            # horizontal flip probability
    color_jitter: float = COLOR_JITTER  # brightness/contrast/saturation jitter (timm's scratch: 0.4)
    val_split: float | None = None  # hold out this share of train/ per class (no val split)
    class_map: str | None = None    # timm class map file: fixes class order and indices
    ema: bool = False               # ModelEmaV3; validation and best.safetensors use it
    ema_decay: float | None = None  # None: suits the run's length (ema_decay_for)
    save_every: int = 0             # also write the train state every N steps (0: per epoch)
    task: str | None = None         # saliency, segmentation or module:object (task.py)
    outputs: str | None = None      # saliency: the model gives probabilities or logits
    iou_loss: bool = False          # saliency: IoU loss beside BCE
    metrics_format: str = "csv"     # csv | jsonl
    strict: bool = False            # stop at the first unreadable image instead of skipping it
    skip_nonfinite: int = 0         # batches with a NaN/inf loss to skip before stopping
    impl: str = "fast"              # gate implementation: fast (fused) or reference (official ops)
    arm: str = "gct"                # gct | control (gates removed) | plain: see compare.py
    channels_last: bool = False     # model and inputs in torch.channels_last
    drop_path: float = 0.0          # stochastic depth rate; a timm model is rebuilt with it

    def __post_init__(self) -> None:
        # The CLI's options refuse out-of-range numbers (typer's min/max); these are the
        # checks a library caller also needs, or that no option can express.
        if self.amp not in AMP_MODES:
            raise UserError(f"--amp {self.amp!r}: choose one of {', '.join(AMP_MODES)}")
        check_given(self.threads, self.workers)
        ranges = (("--crop-scale", self.crop_scale, 0 < self.crop_scale <= 1,
                   f"a share in (0, 1], e.g. {CROP_SCALE}"),
                  ("--ema-decay", self.ema_decay, self.ema_decay is None
                   or 0 <= self.ema_decay < 1, "a number in [0, 1), e.g. 0.999"),
                  ("--val-split", self.val_split, self.val_split is None
                   or 0 < self.val_split < 1, "a share in (0, 1), e.g. --val-split 0.2"),
                  ("--drop-path", self.drop_path, 0 <= self.drop_path < 1,
                   "a rate in [0, 1), e.g. 0.1"))
        for option, value, ok, what in ranges:
            if not ok:
                raise UserError(f"{option} {value}: choose {what}")
        if self.class_map is not None:  # recorded: resume and eval find it from anywhere
            self.class_map = str(Path(self.class_map).resolve())
        ref, sep, attr = (self.task or "").rpartition(":")
        if sep and ref.endswith(".py"):  # recorded in the checkpoint: eval finds it from anywhere
            self.task = f"{Path(ref).resolve()}:{attr}"


RESUMABLE = ("data", "strict", "skip_nonfinite", "epochs")  # what a resume may change


def resume_overrides(*, data: str | None = None, strict: bool | None = None,
                     skip_nonfinite: int | None = None) -> dict:
    """The config fields a resumed run (or comparison) may change, those given only; every
    other recorded setting is fixed (``state.refuse_fixed``), and ``--epochs`` extends the
    stages not yet finished (``state.extend_run``)."""
    given = {"data": data, "strict": strict, "skip_nonfinite": skip_nonfinite}
    return {k: v for k, v in given.items() if v is not None}


def setting(config: Any, key: str, default: Any = None) -> Any:
    """A setting of a ``TrainConfig`` or of a config recorded as a dict (None: default)."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def ema_decay_for(config: TrainConfig, total_steps: int) -> float:
    """``--ema-decay``, or one that suits the run: an averaging window of a tenth of
    its updates (decay 1 - 10/steps), kept within [0.9, 0.9999]. timm's warm-up (decay
    1 - (1 + step)^-3/4 while that is lower) lets the average follow the first steps."""
    if config.ema_decay is not None:
        return config.ema_decay
    return min(0.9999, max(0.9, 1.0 - 10.0 / max(total_steps, 1)))


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict]
    best: dict | None
    seconds: float
    params: int
    gate_params: int
    trainable_params: int  # the most any stage trained
    interrupted: bool = False
    data: dict = field(default_factory=dict)  # data.DataReport.to_dict(): bad files skipped...
    nonfinite_skipped: int = 0                # batches skipped for a non-finite loss
    metric_names: tuple[str, ...] = ()        # the task's metric columns (top1, top5; mae...)
    primary_metric: str = ""                  # the one best.safetensors was chosen by
    higher_is_better: bool = True             # for the primary metric
    stages: list[dict] = field(default_factory=list)  # per stage: trainable params, gate movement
    val_samples: int = 0                      # validation samples each row was measured on
    machine: dict = field(default_factory=dict)  # distributed.MachineChoice.to_dict(): threads, workers

    @property
    def last(self) -> dict | None:
        return self.rows[-1] if self.rows else None

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "best": self.best, "last": self.last,
                "seconds": round(self.seconds, 3), "params": self.params,
                "gate_params": self.gate_params, "trainable_params": self.trainable_params,
                "epochs": sum(1 for r in self.rows if r["epoch"] > 0), "interrupted": self.interrupted, "data": self.data,
                "nonfinite_skipped": self.nonfinite_skipped,
                "metric_names": list(self.metric_names), "primary_metric": self.primary_metric,
                "higher_is_better": self.higher_is_better, "stages": self.stages,
                "val_samples": self.val_samples, "machine": self.machine}
