"""A run folder: the names of its files (``RunDir``), the lock that gives it to one
process (``hold``), and the files besides the checkpoints and the state file:
``metrics.csv`` (or ``.jsonl``), ``metrics.png``, ``run.json``, ``recipe.json`` and
the final epoch's ``per_image.safetensors``; and a comparison's plans and results.

Every file is written atomically and rewritten whole, so a resumed run never
duplicates rows; every JSON is standard JSON (``strict_json``: a missing or non-finite
number is null). The tool reads back what it wrote without re-checking it field by
field: a file that is not what it wrote (cut short, edited) is one ``RunError`` line.

The lock is ``filelock`` on ``RUN/.gct-surgery.lock``, taken before anything in the
folder is read or written and held to the end. The kernel releases it when the process
dies, however it dies; a forked DataLoader worker closes its copy (filelock does so
after a fork), so a worker outliving a killed run never holds the folder. Under
torchrun only rank 0 takes it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..io import atomic
from ..io.atomic import WriteError, atomic_write_text
from .config import RunResult, TrainConfig
from .distributed import is_main_process
from .faults import RunError
from .recipe import Recipe, recipe_from_dict
from .verdict import strict_json

_logger = logging.getLogger(__name__)


class RunDir:
    """Every file name of a run folder, and of a comparison's folder, spelled once."""

    LAST = "last.safetensors"
    BEST = "best.safetensors"
    EMA = "ema.safetensors"
    STATE = "state.pt"                    # the train state a resume continues from
    RUN = "run.json"                      # the run's record, for people (state.pt holds it)
    RECIPE = "recipe.json"
    PLOT = "metrics.png"
    PER_IMAGE = "per_image.safetensors"   # the final epoch's per-image results
    LOCK = ".gct-surgery.lock"
    COMPARISON_PLAN = "comparison-run.json"  # what a comparison was asked: resumable as one unit
    SEED_PLAN = "seed.json"               # OUT/seed-S/: what that seed's arms were asked
    ARM_RESULT = "result.json"            # a finished arm of a comparison
    COMPARISON = "comparison.json"        # a comparison's verdict and runs
    MARKERS = (RUN, STATE, COMPARISON_PLAN, SEED_PLAN)  # what makes a folder a run's

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    @property
    def state(self) -> Path:
        return self.folder / self.STATE

    @staticmethod
    def metrics(fmt: str) -> str:
        return f"metrics.{fmt}"


COMPARISON_PLAN, SEED_PLAN = RunDir.COMPARISON_PLAN, RunDir.SEED_PLAN  # compare.py's names


# --- one process per run folder -----------------------------------------------------

@contextlib.contextmanager
def hold(folder: str | os.PathLike, *, create: bool = True, what: str = "run") -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block; a second holder is refused with one
    line naming the first's pid. ``create``: make the folder (a new run); otherwise it
    must exist (a resume)."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if not is_main_process():
        yield folder
        return
    if not create and not folder.is_dir():
        raise RunError(f"no run folder {folder}: nothing to resume (check the path)")
    atomic.make_folder(folder, f"{what} folder")
    path = folder / RunDir.LOCK
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        pid = ""
        with contextlib.suppress(OSError):
            pid = path.read_text().strip()
        holder = {"": "another process", str(os.getpid()): "this process"}.get(
            pid, f"process {pid}")
        raise RunError(f"{folder} is in use by {holder} (a {what} still writing there): wait "
                       "for it to finish, stop it, or choose another --out") from None
    except OSError as e:
        raise WriteError(f"could not lock the {what} folder {folder}: {e.strerror or e}; choose a "
                         "folder you can write to", path, e.strerror or str(e)) from None
    try:
        with contextlib.suppress(OSError):  # the pid is for the message; a full disk is not fatal
            path.write_text(f"{os.getpid()}\n")
        yield folder
    finally:
        lock.release()


@contextlib.contextmanager
def new_run(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder`` for a new run: refused if it already holds a run or a comparison."""
    with hold(folder) as folder:
        if (folder / RunDir.STATE).exists():
            raise RunError(f"{folder} already holds a run; resume it with --resume {folder} "
                           "or choose another --out")
        if is_comparison(folder):
            raise RunError(f"{folder} holds a comparison (--baseline); continue it with "
                           f"--resume {folder} or choose another --out")
        yield folder


def replace_run(folder: str | os.PathLike) -> None:
    """``finetune --force``: empty ``folder`` for a new run, when it holds a run or a
    comparison that no live process holds (the lock says so). A folder that holds
    something else is never touched: refused with one line."""
    folder = Path(folder)
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return  # nothing to replace
    if not folder.is_dir() or not any((folder / m).exists() for m in RunDir.MARKERS):
        raise RunError(f"{folder} is not a run folder (no {', '.join(RunDir.MARKERS)}), so --force "
                       "will not empty it; choose another --out")
    with hold(folder, create=False):  # refused when a live run holds it
        for entry in folder.iterdir():
            if entry.name == RunDir.LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        _logger.info("removed the earlier run in %s (--force)", folder)


# --- metrics ------------------------------------------------------------------------

def write_metrics(run_dir: Path, rows: list[dict], metrics_format: str) -> Path:
    """All rows so far, rewritten atomically (so a resumed run never duplicates rows)."""
    path = run_dir / RunDir.metrics(metrics_format)
    if metrics_format == "jsonl":
        atomic_write_text(path, "".join(strict_json(r, None) + "\n" for r in rows))
        return path
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())
    return path


def write_plot(run_dir: Path, rows: list[dict], primary_metric: str) -> None:
    """metrics.png: losses and the primary metric per epoch (row 0 on), stage boundaries
    marked."""
    lines = [(0, rows, "train_loss", dict(marker="o", label="train loss")),
             (0, rows, "val_loss", dict(marker="o", label="val loss")),
             (1, rows, primary_metric, dict(marker="o", color="C2", label=f"val {primary_metric}"))]
    save_figure(run_dir / RunDir.PLOT, lines, rows, primary_metric,
                f"gct-surgery finetune: {run_dir.name}")


def save_figure(path: Path, lines: list, stage_rows: list[dict], metric: str, title: str) -> None:
    """Two panels, loss and metric: each line is ``(panel, rows, key, style)`` plotted per
    epoch; the stages of ``stage_rows`` marked. Matplotlib's ``Figure``: no pyplot, no
    display, no global figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, 2)
    for panel, rows, key, style in lines:
        axes[panel].plot([r["epoch"] for r in rows], [r[key] for r in rows], **style)
    _mark_stages(axes, stage_rows)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel(f"val {metric}")
    fig.suptitle(title, fontsize=9, wrap=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _mark_stages(axes, rows: list[dict]) -> None:
    """A dashed line and the stage's name where each stage begins."""
    for ax in axes:
        previous = None
        for r in rows:
            if r["stage"] != previous:
                ax.axvline(r["epoch"] - 0.5, color="grey", linestyle="--", linewidth=0.8)
                ax.text(r["epoch"] - 0.45, 0.98, r["stage"], transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, color="grey")
                previous = r["stage"]
        ax.set_xlabel("epoch (0: before training)")
        ax.legend()


# --- the run's record ------------------------------------------------------------------

def run_record(*, source: str, config: TrainConfig, recipe: Recipe, world_size: int,
               data: dict, machine: dict) -> dict:
    """What a run started from (checkpoint, config, recipe, world size), what the data
    was (``state.data_record``) and what this start chose (threads, workers; a resume
    chooses again). Kept in the state file, as plain JSON types; ``run.json`` is a copy
    for people, never read back."""
    return json.loads(strict_json({
        "checkpoint": source, "config": asdict(config), "recipe": recipe.to_dict(),
        "world_size": world_size, "data": data, "machine": machine, "history": []}))


def write_run_json(run_dir: Path, record: dict) -> None:
    """``run.json`` (the record, to read) and ``recipe.json`` (the recipe alone, to reuse)."""
    atomic_write_text(run_dir / RunDir.RUN, strict_json(record) + "\n")
    recipe = json.dumps(record["recipe"], indent=2, sort_keys=True)
    atomic_write_text(run_dir / RunDir.RECIPE, recipe + "\n")


def _damaged(path: Path, what: str) -> RunError:
    return RunError(f"{path} is damaged or was edited ({what}), so the run cannot resume from it; "
                    "restore it from a copy, or start the run again with a new --out")


def read_json(path: Path) -> dict:
    """A JSON object this tool wrote, or one ``RunError`` line."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path.parent} has no {path.name}, so it cannot be resumed (is it a run "
                       "folder?); start the run again with a new --out") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, f"not valid JSON: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(doc, dict):
        raise _damaged(path, "not a JSON object")
    return doc


def rebuild_record(path: Path, doc: dict, **config) -> tuple[TrainConfig, Recipe]:
    """The config and recipe a run's record or a comparison's plan holds, or one line."""
    try:
        recipe = doc["recipe"]
        return (TrainConfig(**{**doc["config"], **config}),
                recipe_from_dict(recipe, source=str(recipe.get("source", "recipe"))))
    except KeyError as e:
        raise _damaged(path, f"no {e}") from None
    except (TypeError, ValueError, AttributeError, UserError) as e:
        raise _damaged(path, str(e)[:120]) from None


def with_extension(doc: dict, recipe: Recipe, *, epochs: int,
                   config_changes: dict | None = None) -> dict:
    """A run's record (or a comparison's plan) with the extended ``recipe``, which every
    later resume reads, and a ``history`` entry saying the run was extended."""
    import time

    history = [*doc.get("history", []), {
        "event": "extended", "epochs": epochs, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": {s.name: s.epochs for s in recipe.stages}}]
    return {**doc, "history": history, "recipe": recipe.to_dict(),
            "config": {**doc["config"], **(config_changes or {})}}


# --- a comparison's files ------------------------------------------------------------

ARM_STYLE = {"gct": ("C0", "-"), "control": ("C1", "--"), "plain": ("C2", ":")}


def write_comparison(comparison) -> tuple[Path, Path]:
    """``comparison.json`` (the verdict and every run) and ``metrics.png``: val loss and
    the primary metric per epoch, GCT and control (and plain) together, one line per seed."""
    out = Path(comparison.out)
    doc_path = out / RunDir.COMPARISON
    atomic_write_text(doc_path, strict_json(comparison.to_dict()) + "\n")
    key, first = comparison.metric, comparison.runs[0]
    lines = [(panel, result.rows, name, dict(color=ARM_STYLE[arm][0], linestyle=ARM_STYLE[arm][1],
                                            marker=".", label=arm if runs is first else None))
             for runs in comparison.runs for arm, result in runs.arms.items()
             for panel, name in ((0, "val_loss"), (1, key))]
    save_figure(out / RunDir.PLOT, lines, first.gct.rows, key, comparison.verdict.text)
    return doc_path, out / RunDir.PLOT


def record_extension(path: Path, recipe: Recipe, *, epochs: int) -> None:
    """A comparison's plan at ``path`` takes the extended ``recipe`` (``with_extension``)."""
    atomic_write_text(path, strict_json(with_extension(read_json(path), recipe, epochs=epochs))
                      + "\n")


def is_comparison(folder: str | Path) -> bool:
    """True for the folder of a ``--baseline`` comparison, or of one of its seeds."""
    return any((Path(folder) / name).is_file() for name in (COMPARISON_PLAN, SEED_PLAN))


def write_plan(path: Path, plan: dict) -> None:
    """A comparison's plan (``OUT/comparison-run.json``) or one seed's (``seed-S/seed.json``):
    what ``finetune --resume`` continues and ``gct-surgery verdict`` reads."""
    doc = {**plan, "recipe": plan["recipe"].to_dict(), "config": asdict(plan["config"])}
    atomic_write_text(path, strict_json(doc) + "\n")


def read_plan(path: Path) -> dict:
    """The plan ``write_plan`` wrote, with its recipe and config rebuilt (the config's
    ``out``: the folder the plan is in, or above a seed's)."""
    doc = read_json(path)
    out = path.parent.parent if path.name == SEED_PLAN else path.parent
    config, recipe = rebuild_record(path, doc, out=str(out))
    doc.pop("history", None)
    return {**doc, "recipe": recipe, "config": config}


def write_arm_result(result: RunResult) -> None:
    """``result.json`` in a finished arm's folder: a resumed comparison reads it back
    instead of running the arm again."""
    doc = {**asdict(result), "run_dir": str(result.run_dir)}
    atomic_write_text(Path(result.run_dir) / RunDir.ARM_RESULT, strict_json(doc) + "\n")


def read_arm_result(run_dir: Path) -> RunResult | None:
    """The finished arm's result, or None when the arm has not finished."""
    path = Path(run_dir) / RunDir.ARM_RESULT
    if not path.is_file():
        return None
    doc = read_json(path)
    doc = {**doc.get("result", {}), **doc}  # older files: the result beside its rows
    nan = float("nan")  # strict JSON wrote a missing number as null
    try:
        rows = [{k: nan if v is None else v for k, v in row.items()} for row in doc["rows"]]
        fields = {k: doc[k] for k in RunResult.__dataclass_fields__ if k in doc}
        return RunResult(**{**fields, "run_dir": Path(run_dir), "rows": rows,
                            "metric_names": tuple(doc["metric_names"])})
    except (KeyError, TypeError, AttributeError) as e:
        raise _damaged(path, f"result: {e}") from None


def write_per_image(run_dir: Path, values, metric: str) -> None:
    """``per_image.safetensors``: one row per validation image, in the set's order."""
    from safetensors.torch import save

    data = save({"values": values.contiguous()}, metadata={"metric": metric})
    atomic.atomic_write_bytes(Path(run_dir) / RunDir.PER_IMAGE, data)


def read_per_image(run_dir: Path):
    """The per-image rows a finished run kept (a float64 numpy array), or None."""
    path = Path(run_dir) / RunDir.PER_IMAGE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))["values"]
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise RunError(f"{path} is damaged ({str(e)[:80]}); run that arm again with a new "
                       "--out") from None
