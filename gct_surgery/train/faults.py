"""What can go wrong during a run, and how each fault surfaces (docs/reliability.md).

- SIGINT (Ctrl-C) and SIGTERM (preemption) set a ``StopFlag``: the loop saves a
  resumable state, then raises ``Interrupted``.
- A NaN or infinite loss or weight raises ``NonFiniteLossError``; nothing non-finite
  is ever saved.
- A failed write (disk full) becomes one ``WriteError`` (``writing``); the previous
  file is kept.
- ``GCT_SURGERY_FAULT`` is a testing hook that makes the process signal itself at a
  chosen point, so the tests can kill a run exactly where they mean to.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

_logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and preemption


class RunError(UserError):
    """A run folder cannot be started or resumed."""


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN or infinite; nothing non-finite was saved."""


class WriteError(UserError):
    """An output could not be written (disk full, file too large, no permission)."""


class Interrupted(KeyboardInterrupt):
    """Raised after Ctrl-C or SIGTERM once the resumable state is on disk."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


class StopFlag:
    """Ctrl-C (SIGINT) or preemption (SIGTERM) sets a flag; the loop saves a resumable
    state at the end of the current step (or epoch) and stops. A second signal
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def nonfinite_weight(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or inf, if any."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


# --- writing outputs ----------------------------------------------------------------

@contextlib.contextmanager
def writing(path: Path, hint: str = ""):
    """Turn a failed write (disk full, file too large...) into one clear error. The
    write itself goes through ``atomic_path``, so the previous file is untouched."""
    try:
        yield
    except OSError as e:
        raise _write_error(path, e.strerror or str(e), hint) from None
    except Exception as e:  # safetensors reports I/O errors as its own SafetensorError
        if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):
            reason = str(e).split("I/O error:", 1)[1].split("(os error")[0].strip()
            raise _write_error(path, reason, hint) from None
        raise


def _write_error(path: Path, reason: str, hint: str) -> WriteError:
    return WriteError(f"could not write {path}: {reason}. The previous {Path(path).name}, if "
                      f"any, is unchanged{hint}")


# --- testing hook -------------------------------------------------------------------

FAULT_ENV = "GCT_SURGERY_FAULT"
_FAULT_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


@dataclass(frozen=True)
class Fault:
    """A parsed ``GCT_SURGERY_FAULT=ACTION:POINT:ARG``."""

    action: str  # kill | term | int: the signal to send
    point: str   # after_step | between_stages | during_save
    arg: str     # N; for during_save, FILE[:N]


def parse_fault(spec: str) -> Fault | None:
    """The fault ``spec`` names, or None when it is not one this tool knows."""
    action, _, rest = spec.partition(":")
    point, _, arg = rest.partition(":")
    known = action in _FAULT_SIGNALS and (
        (point in ("after_step", "between_stages") and arg.isdigit())
        or (point == "during_save" and action == "kill" and arg))
    return Fault(action, point, arg) if known else None


def check_fault_spec() -> None:
    """Refuse a misspelt hook up front, rather than train without the fault."""
    spec = os.environ.get(FAULT_ENV)
    if spec and parse_fault(spec) is None:
        raise RunError(f"{FAULT_ENV}={spec!r} is not a fault this tool knows: use "
                       "kill|term|int:after_step:N, kill|term|int:between_stages:N or "
                       "kill:during_save:FILE[:N] (a testing hook; unset it to train)")


def fault_hook(point: str, count: int) -> None:
    """Testing hook: ``GCT_SURGERY_FAULT=ACTION:POINT:N`` makes this process send itself
    SIGKILL (``kill``), SIGTERM (``term``) or SIGINT (``int``) at a chosen point:
    ``after_step:N`` (after its N-th training step) or ``between_stages:N`` (after
    stage N, before the next). ``kill:during_save:FILE[:N]`` lives in ``io/atomic.py``.
    Unset (always, outside tests) it costs one dictionary lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault = parse_fault(spec)
    if fault is not None and fault.point == point and fault.arg.isdigit() and int(fault.arg) == count:
        os.kill(os.getpid(), _FAULT_SIGNALS[fault.action])


# --- stopping a run -----------------------------------------------------------------

def nonfinite_loss(run: Any, stage: Any, value: float, steps_per_epoch: int) -> None:
    """Count a skipped batch, or stop the stage when ``--skip-nonfinite`` is spent.
    Nothing has been written since the last good save, so the run's files stay good."""
    progress, allowed = run.progress, run.config.skip_nonfinite
    where = (f"stage {stage.name!r}, epoch {progress.epoch + 1}, step {progress.step_in_epoch + 1} "
             f"of {steps_per_epoch} (update {progress.stage_step + 1} of the stage)")
    if progress.nonfinite_skipped < allowed:
        progress.nonfinite_skipped += 1
        _logger.warning("non-finite loss (%s) at %s: batch skipped", value, where)
        run.emit("nonfinite_skipped", stage=stage.name, epoch=progress.epoch,
                 step=progress.step_in_epoch + 1, loss=value, skipped=progress.nonfinite_skipped,
                 allowed=allowed)
        return
    spent = (f" after skipping {progress.nonfinite_skipped} such batch(es), all --skip-nonfinite "
             "allows" if allowed else "")
    raise NonFiniteLossError(
        f"non-finite loss ({value}) at {where}{spent}. The files in {run.run_dir} are from the "
        "last good save and were not touched. Lower the learning rate (or use --amp off), or "
        "pass --skip-nonfinite N to skip up to N such batches")


def stop_run(run: Any, stage: Any) -> None:
    """After SIGINT/SIGTERM, with the state on disk: report and stop."""
    signum = run.stop.signum or signal.SIGINT
    run.emit("interrupted", run_dir=str(run.run_dir), stage=stage.name, epoch=run.progress.epoch,
             step=run.progress.step_in_epoch, signal=signal.Signals(signum).name)
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}; resume with "
                      f"--resume {run.run_dir}", signum)
