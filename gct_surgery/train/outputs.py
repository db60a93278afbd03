"""The files of a run folder besides the checkpoints and ``state.pt``: ``metrics.csv``
(or ``.jsonl``), ``metrics.png``, ``run.json`` and ``recipe.json``. Every one is
written atomically, and rewritten whole, so a resumed run never duplicates rows."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..io.atomic import atomic_write_text
from ..io.figures import new_figure, save_png
from .config import TrainConfig
from .faults import writing
from .progress import STATE_FILE
from .recipe import Recipe, recipe_from_dict

_logger = logging.getLogger(__name__)

RUN_FILES = ("last.safetensors", "best.safetensors", "ema.safetensors", STATE_FILE, "metrics.csv", "metrics.jsonl",
             "metrics.png", "run.json", "recipe.json")


def write_metrics(run_dir: Path, rows: list[dict], metrics_format: str) -> Path:
    """All rows so far, rewritten atomically (so a resumed run never duplicates rows)."""
    if metrics_format == "jsonl":
        path = run_dir / "metrics.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return path
    path = run_dir / "metrics.csv"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())
    return path


def write_plot(run_dir: Path, rows: list[dict], primary_metric: str) -> Path | None:
    """metrics.png: losses and the primary metric per epoch, stage boundaries marked."""
    if not rows:
        return None
    fig, plt = new_figure(1, 2, (10, 4))
    ax_loss, ax_metric = fig.axes
    epochs = [r["epoch"] for r in rows]
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="val loss")
    ax_metric.plot(epochs, [r[primary_metric] for r in rows], marker="o", color="C2",
                   label=f"val {primary_metric}")
    _mark_stages(fig.axes, rows)
    fig.suptitle(f"gct-surgery finetune: {run_dir.name}")
    return save_png(fig, plt, run_dir / "metrics.png")


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


def write_run_info(run_dir: Path, *, source: str, config: TrainConfig, recipe: Recipe,
                   world_size: int) -> None:
    """run.json (checkpoint, config, recipe: what ``resume`` rebuilds the run from) and
    recipe.json (the recipe alone, to read or reuse)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"checkpoint": source, "config": asdict(config), "recipe": recipe.to_dict(),
            "world_size": world_size}
    with writing(run_dir / "run.json"):
        atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    with writing(run_dir / "recipe.json"):
        atomic_write_text(run_dir / "recipe.json", recipe.to_json() + "\n")


def read_run_info(run_dir: Path, overrides: dict) -> tuple[TrainConfig, Recipe, str]:
    """What run.json records: the config (with ``overrides`` applied), the recipe, and
    the checkpoint the run started from."""
    info = json.loads((run_dir / "run.json").read_text())
    config = TrainConfig(**{**info["config"], **overrides, "out": str(run_dir)})
    recipe = recipe_from_dict(info["recipe"], source=info["recipe"].get("source", "recipe"))
    return config, recipe, info.get("checkpoint", "?")


def remove_stale_temps(run_dir: Path) -> None:
    """A process killed mid-write leaves its temp file (``.last.safetensors.XXXX.tmp``);
    the output itself is intact. A resumed run removes those leftovers."""
    for path in run_dir.glob(".*.tmp"):
        if any(path.name.startswith(f".{name}.") for name in RUN_FILES):
            with contextlib.suppress(OSError):
                path.unlink()
                _logger.info("removed %s, left by an interrupted write", path)

# --- a comparison's files ------------------------------------------------------------

ARM_STYLE = {"gct": ("C0", "-"), "control": ("C1", "--"), "plain": ("C2", ":")}


def write_comparison(comparison) -> tuple[Path, Path]:
    """``comparison.json`` (the verdict and every run) and ``metrics.png``: val loss and
    the primary metric per epoch, GCT and control (and plain) together, one line per seed."""
    out = Path(comparison.out)
    out.mkdir(parents=True, exist_ok=True)
    doc_path = out / "comparison.json"
    with writing(doc_path):
        atomic_write_text(doc_path, json.dumps(comparison.to_dict(), indent=2, default=str) + "\n")
    fig, plt = new_figure(1, 2, (11, 4))
    ax_loss, ax_metric = fig.axes
    key = comparison.metric
    for runs in comparison.runs:
        for arm in ("gct", "control", "plain"):
            result = getattr(runs, arm)
            if result is None:
                continue
            colour, style = ARM_STYLE[arm]
            label = arm if runs is comparison.runs[0] else None
            epochs = [r["epoch"] for r in result.rows]
            ax_loss.plot(epochs, [r["val_loss"] for r in result.rows], color=colour, linestyle=style,
                         marker=".", label=label)
            ax_metric.plot(epochs, [r[key] for r in result.rows], color=colour, linestyle=style,
                           marker=".", label=label)
    ax_loss.set_ylabel("val loss")
    ax_metric.set_ylabel(f"val {key}")
    _mark_stages(fig.axes, comparison.runs[0].gct.rows)
    fig.suptitle(comparison.verdict.text, fontsize=9, wrap=True)
    return doc_path, save_png(fig, plt, out / "metrics.png")
