"""One run's objects, handed to the stage and epoch functions: what it trains, on what
data, where it writes, how it reports, and where it stands (``progress``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io.metadata import CheckpointMeta
from . import distributed
from .config import TrainConfig
from .faults import StopFlag
from .progress import STATE_FILE, Progress
from .recipe import Recipe
from .task import Task

Event = Callable[[str, dict], None]


@dataclass
class Run:
    """Everything one run holds; passed to the stage and epoch functions."""

    config: TrainConfig
    recipe: Recipe
    run_dir: Path
    model: nn.Module
    meta: CheckpointMeta
    task: Task
    train_set: Any
    val_set: Any
    device: torch.device
    dist: distributed.Dist
    on_event: Event
    ema: Any = None                # timm's ModelEmaV3, under --ema
    stop: StopFlag | None = None
    progress: Progress = field(default_factory=Progress)
    resume_from: dict | None = None  # the train state resumed from: its stage's optimizer...
    machine: Any = None            # machine.MachineChoice: threads and loader workers

    @property
    def resume_hint(self) -> str:
        if (self.run_dir / STATE_FILE).is_file():
            return f"; fix the cause and continue with: gct-surgery finetune --resume {self.run_dir}"
        return "; fix the cause and start the run again"

    @property
    def per_rank_batch(self) -> int:
        return self.config.batch_size // self.dist.world_size

    def emit(self, event: str, **info: Any) -> None:
        if self.dist.is_main:
            self.on_event(event, info)
