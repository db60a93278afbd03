"""What can go wrong during a run, and how each fault surfaces (docs/reliability.md).

- SIGINT (Ctrl-C), SIGTERM (preemption) and SIGHUP (a closed terminal or ssh session)
  set a ``StopFlag``: the loop saves a resumable state, then raises ``Interrupted``.
  A second signal stops at once, saying what is on disk.
- A NaN or infinite loss or weight raises ``NonFiniteLossError``; nothing non-finite
  is ever saved, and a checkpoint that already holds one is refused by name
  (``refuse_nonfinite``).
- A failed write (disk full) becomes one ``WriteError`` (``io/atomic.py``; ``writing``
  adds how to continue); the previous file is kept.
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

from torch import nn

from ..errors import UserError
from ..io.atomic import WriteError, as_write_error  # noqa: F401 (WriteError re-exported)
from ..io.finite import first_nonfinite, refuse_nonfinite  # noqa: F401 (re-exported)

_logger = logging.getLogger(__name__)

# Ctrl-C, preemption, and a closed terminal or ssh session
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class RunError(UserError):
    """A run folder cannot be started or resumed."""


class NonFiniteLossError(UserError):
    """The loss (or the weights) became NaN or infinite; nothing non-finite was saved."""


class Interrupted(KeyboardInterrupt):
    """Raised after a stop signal once the resumable state is on disk; ``hard`` after a
    second signal, which stops at once (the message says what is on disk)."""

    def __init__(self, message: str, signum: int = signal.SIGINT, hard: bool = False) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.hard = hard


_saved: dict[str, str] = {}  # run folder -> where its last state.pt stands


def note_saved(run_dir: Path, where: str) -> None:
    """Called after each state.pt lands: what a hard stop reports as on disk."""
    _saved[str(run_dir)] = where


class StopFlag:
    """Ctrl-C (SIGINT), preemption (SIGTERM) or a closed terminal (SIGHUP) sets a flag;
    the loop saves a resumable state at the end of the current step (or epoch) and
    stops. A second signal interrupts at once, naming what ``run_dir`` holds."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.requested = False
        self.signum: int | None = None
        self.run_dir = run_dir
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            for s in STOP_SIGNALS:
                if s == getattr(signal, "SIGHUP", None) and signal.getsignal(s) == signal.SIG_IGN:
                    continue  # started under nohup: a closed terminal must not stop the run
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Interrupted(self.hard_stop_message(signum), signum, hard=True)
        self.requested = True
        self.signum = signum

    def hard_stop_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        run_dir = self.run_dir
        if run_dir is None:
            return f"stopped at once by a second {name}"
        where = _saved.get(str(run_dir))
        if where is None and not (Path(run_dir) / "state.pt").is_file():
            return (f"stopped at once by a second {name}, before any resumable state was saved: "
                    f"start the run again (same command and --out {run_dir})")
        at = f" ({where})" if where else ""
        return (f"stopped at once by a second {name}: {run_dir} holds the last save{at}, "
                f"untouched; continue with: gct-surgery finetune --resume {run_dir}")

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def nonfinite_weight(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or inf, if any."""
    found = first_nonfinite(itertools.chain(model.named_parameters(), model.named_buffers()))
    return found[0] if found else None


# --- writing outputs ----------------------------------------------------------------

@contextlib.contextmanager
def writing(path: Path, hint: str = ""):
    """A failed write (disk full, file too large...) as one clear error that says how to
    continue (``hint``). The write itself goes through ``atomic_path``, so the previous
    file is untouched."""
    try:
        yield
    except Exception as e:  # OSError, WriteError, safetensors' SafetensorError
        converted = as_write_error(path, e, hint)
        if converted is None:
            raise
        raise converted from None


# --- testing hook -------------------------------------------------------------------

FAULT_ENV = "GCT_SURGERY_FAULT"
_FAULT_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT,
                  "hup": signal.SIGHUP}


@dataclass(frozen=True)
class Fault:
    """A parsed ``GCT_SURGERY_FAULT=ACTION:POINT:ARG``."""

    action: str  # kill | term | int | hup: the signal to send
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
                       "kill|term|int|hup:after_step:N, kill|term|int|hup:between_stages:N or "
                       "kill:during_save:FILE[:N] (a testing hook; unset it to train)")


def fault_hook(point: str, count: int | None = None) -> None:
    """Testing hook: ``GCT_SURGERY_FAULT=ACTION:POINT:N`` makes this process send itself
    SIGKILL (``kill``), SIGTERM (``term``), SIGINT (``int``) or SIGHUP (``hup``) at a
    chosen point:
    ``after_step:N`` (after its N-th training step, over every run it does) or
    ``between_stages:N`` (after
    stage N, before the next). ``kill:during_save:FILE[:N]`` lives in ``io/atomic.py``.
    Unset (always, outside tests) it costs one dictionary lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    if count is None:  # training steps, counted over every run of this process (a comparison runs several)
        _steps[0] += 1
        count = _steps[0]
    fault = parse_fault(spec)
    if fault is not None and fault.point == point and fault.arg.isdigit() and int(fault.arg) == count:
        os.kill(os.getpid(), _FAULT_SIGNALS[fault.action])


_steps = [0]  # training steps this process has run, for ``after_step``


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
