"""What can go wrong during a run, and how each fault surfaces (docs/reliability.md).

- SIGINT (Ctrl-C), SIGTERM (preemption) and SIGHUP (a closed terminal or ssh session)
  set a ``StopFlag``: the loop saves a resumable state, then raises ``Interrupted``.
  A second signal stops at once, saying what is on disk.
- A NaN or infinite loss or weight raises ``NonFiniteLossError``; nothing non-finite
  is ever saved.
- A failed write (disk full) becomes one ``WriteError`` (``io/atomic.py``; ``writing``
  adds how to continue); the previous file is kept.
- ``GCT_SURGERY_FAULT`` is a testing hook that makes the process signal itself at a
  chosen point, so the tests can kill a run exactly where they mean to. It is read at
  the start of a command or run (``install_fault``); the write path itself only has
  ``io.atomic.before_replace``.

No torch at import: the CLI installs the hook before it loads anything heavy.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import atomic
from ..io.atomic import as_write_error

_logger = logging.getLogger(__name__)

# Ctrl-C, preemption, and a closed terminal or ssh session
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


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


class StopFlag:
    """Ctrl-C (SIGINT), preemption (SIGTERM) or a closed terminal (SIGHUP) sets a flag;
    the loop saves a resumable state at the end of the current step (or epoch) and
    stops. A second signal interrupts at once, naming what ``run_dir`` holds."""

    def __init__(self, run_dir: Path) -> None:
        self.requested = False
        self.signum: int | None = None
        self.run_dir = run_dir
        self.saved: str | None = None  # where the state on disk stands (state.note_position)
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
        if self.saved is None:
            return (f"stopped at once by a second {name}, before any resumable state was saved: "
                    f"start the run again (same command and --out {self.run_dir})")
        return (f"stopped at once by a second {name}: {self.run_dir} holds the last save "
                f"({self.saved}), untouched; continue with: gct-surgery finetune --resume "
                f"{self.run_dir}")

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
_fault: dict[str, Any] = {"spec": None}  # the installed spec and its armed point


def install_fault() -> None:
    """Read ``GCT_SURGERY_FAULT=ACTION:POINT:N`` (a testing hook; docs/reliability.md):
    this process sends itself SIGKILL (``kill``), SIGTERM, SIGINT or SIGHUP ``after_step:N``
    (its N-th training step, over every run it does) or ``between_stages:N`` (after
    stage N). ``kill:during_save:FILE[:N]`` kills during the N-th write of FILE, before
    the rename, through ``io.atomic.before_replace``. A spec already installed keeps its
    counts; a misspelt one is refused rather than trained without."""
    spec = os.environ.get(FAULT_ENV) or None
    if spec == _fault["spec"]:
        return
    action, _, rest = (spec or "").partition(":")
    point, _, arg = rest.partition(":")
    name, _, n = arg.partition(":") if point == "during_save" else ("", "", arg)
    n = n or ("1" if name else "")
    known = action in _FAULT_SIGNALS and n.isdigit() and (
        point in ("after_step", "between_stages") or (point == "during_save" and action == "kill"))
    if spec and not known:
        raise RunError(f"{FAULT_ENV}={spec!r} is not a fault this tool knows: use "
                       "kill|term|int|hup:after_step:N, kill|term|int|hup:between_stages:N or "
                       "kill:during_save:FILE[:N] (a testing hook; unset it to train)")
    _fault.update(spec=spec, point=point if spec else None, n=int(n or 0), steps=0,
                  signal=_FAULT_SIGNALS.get(action))
    writes = itertools.count(1)

    def before_replace(dest: Path) -> None:
        if dest.name == name and next(writes) == _fault["n"]:
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.before_replace = before_replace if point == "during_save" and spec else None


def fault_point(point: str, count: int | None = None) -> None:
    """Where the loop may be killed by the hook: ``after_step`` (counted here, over every
    run of this process) or ``between_stages`` (``count``: the stages done)."""
    if _fault["spec"] is None or _fault["point"] != point:
        return
    if count is None:
        _fault["steps"] += 1
        count = _fault["steps"]
    if count == _fault["n"]:
        os.kill(os.getpid(), _fault["signal"])


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
