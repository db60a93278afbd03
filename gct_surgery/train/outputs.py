"""The files of a run folder besides the checkpoints and ``state.pt``: ``metrics.csv``
(or ``.jsonl``), ``metrics.png``, ``run.json``, ``recipe.json`` and the final epoch's
``per_image.safetensors``; and a comparison's plans and results. Every one is written
atomically, and rewritten whole, so a resumed run never duplicates rows; every JSON is
standard JSON (``strict_json``: a missing or non-finite number is null)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..io import atomic
from ..io.atomic import atomic_write_text
from ..io.figures import new_figure, save_png
from .config import RunResult, TrainConfig
from .faults import RunError, writing
from .progress import STATE_FILE
from .recipe import Recipe, recipe_from_dict
from .verdict import strict_json

_logger = logging.getLogger(__name__)

RUN_FILES = ("last.safetensors", "best.safetensors", "ema.safetensors", STATE_FILE, "metrics.csv",
             "metrics.jsonl", "metrics.png", "run.json", "recipe.json", "per_image.safetensors")


def write_metrics(run_dir: Path, rows: list[dict], metrics_format: str) -> Path:
    """All rows so far, rewritten atomically (so a resumed run never duplicates rows)."""
    if metrics_format == "jsonl":
        path = run_dir / "metrics.jsonl"
        atomic_write_text(path, "".join(strict_json(r, None) + "\n" for r in rows))
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
                   world_size: int, data: dict | None = None, machine: dict | None = None) -> None:
    """run.json (checkpoint, config, recipe: what ``resume`` rebuilds the run from, and
    what the data was: ``world.data_record``) and recipe.json (the recipe alone, to
    read or reuse)."""
    atomic.make_folder(run_dir, "run folder")
    info = {"checkpoint": source, "config": asdict(config), "recipe": recipe.to_dict(),
            "world_size": world_size}
    if data is not None:
        info["data"] = data
    if machine is not None:  # what this start chose (threads, workers); a resume chooses again
        info["machine"] = machine
    with writing(run_dir / "run.json"):
        atomic_write_text(run_dir / "run.json", strict_json(info) + "\n")
    with writing(run_dir / "recipe.json"):
        atomic_write_text(run_dir / "recipe.json", recipe.to_json() + "\n")


RUN_INFO = {"checkpoint": str, "config": dict, "recipe": dict, "world_size": int, "data": dict,
            "machine": dict, "history": list}
_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None)}


def _damaged_json(path: Path, what: str) -> RunError:
    return RunError(f"{path} is damaged or was edited ({what}), so the run cannot resume from it; "
                    "restore it from a copy, or start the run again with a new --out")


def read_json_doc(path: Path, fields: dict[str, type], required: tuple[str, ...]) -> dict:
    """A JSON object with known fields of known types, or one ``RunError`` line."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path.parent} has no {path.name}, so it cannot be resumed (is it a run "
                       "folder?); start the run again with a new --out") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged_json(path, f"not valid JSON: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(doc, dict):
        raise _damaged_json(path, "not a JSON object")
    for key, value in doc.items():
        if key not in fields:
            raise _damaged_json(path, f"unknown field {key!r}")
        if not isinstance(value, fields[key]) or (fields[key] is int and isinstance(value, bool)):
            raise _damaged_json(path, f"{key} is not a {getattr(fields[key], '__name__', 'value')}")
    missing = [k for k in required if k not in doc]
    if missing:
        raise _damaged_json(path, f"no {missing[0]!r}")
    return doc


def read_run_json(run_dir: Path) -> dict:
    """run.json, validated field by field (what the run started from)."""
    return read_json_doc(Path(run_dir) / "run.json", RUN_INFO, ("checkpoint", "config", "recipe"))


def read_run_info(run_dir: Path, overrides: dict) -> tuple[TrainConfig, Recipe, str]:
    """What run.json records: the config (with ``overrides`` applied), the recipe, and
    the checkpoint the run started from. Every config value is checked for its type."""
    path = Path(run_dir) / "run.json"
    info = read_run_json(run_dir)
    _check_config(path, info["config"])
    try:
        config = TrainConfig(**{**info["config"], **overrides, "out": str(run_dir)})
        recipe = recipe_from_dict(info["recipe"], source=str(info["recipe"].get("source", "recipe")))
    except TypeError as e:
        raise _damaged_json(path, str(e)) from None
    except UserError as e:
        raise _damaged_json(path, str(e)) from None
    return config, recipe, info["checkpoint"]


def record_extension(path: Path, recipe: Recipe, *, epochs: int, config_changes: dict | None = None) -> None:
    """run.json (or a comparison's plan) at ``path`` takes the extended ``recipe`` (what
    every later resume reads) and a ``history`` entry saying the run was extended; a
    run's recipe.json follows."""
    import time

    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["history"] = [*doc.get("history", []), {
        "event": "extended", "epochs": epochs, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stages": {s.name: s.epochs for s in recipe.stages}}]
    doc["recipe"] = recipe.to_dict()
    doc["config"] = {**doc["config"], **(config_changes or {})}
    with writing(path):
        atomic_write_text(path, strict_json(doc) + "\n")
    if path.name == "run.json":
        with writing(path.parent / "recipe.json"):
            atomic_write_text(path.parent / "recipe.json", recipe.to_json() + "\n")


def _check_config(path: Path, config: dict) -> None:
    """Every recorded config value is a field of ``TrainConfig``, of that field's type."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in config.items():
        if key not in known:
            raise _damaged_json(path, f"unknown config field {key!r}")
        kinds = tuple(_TYPES.get(t.strip(), object) for t in str(known[key].type).split("|"))
        flat = tuple(k for kind in kinds for k in (kind if isinstance(kind, tuple) else (kind,)))
        if not isinstance(value, flat) or (isinstance(value, bool) and bool not in flat):
            raise _damaged_json(path, f"config {key} is {value!r:.40}")


def remove_stale_temps(run_dir: Path) -> None:
    """A process killed mid-write leaves its temp file (``.last.safetensors.XXXX.tmp``);
    the output itself is intact. A resumed run removes those leftovers; a temp file a
    live process still writes is locked and left alone (``atomic.remove_stale_temps``)."""
    for name in RUN_FILES:
        for path in atomic.remove_stale_temps(run_dir, name):
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
        atomic_write_text(doc_path, strict_json(comparison.to_dict()) + "\n")
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


COMPARISON_PLAN = "comparison-run.json"  # what a comparison was asked: resumable as one unit
SEED_PLAN = "seed.json"                   # OUT/seed-S/: what that seed's arms were asked
ARM_RESULT = "result.json"                # a finished arm of a comparison
PER_IMAGE = "per_image.safetensors"       # a run's per-image results at its final epoch
PLAN_FIELDS = {"checkpoint": str, "recipe": dict, "config": dict, "seeds": (int, str, type(None)),
               "max_seeds": int, "plain": bool, "control": str,
               "resolution": (int, float, type(None)), "seed": int, "index": (int, type(None)),
               "history": list}


def is_comparison(folder: str | Path) -> bool:
    """True for the folder of a ``--baseline`` comparison, or of one of its seeds."""
    return any((Path(folder) / name).is_file() for name in (COMPARISON_PLAN, SEED_PLAN))


def write_plan(path: Path, plan: dict) -> None:
    """A comparison's plan (``OUT/comparison-run.json``) or one seed's (``seed-S/seed.json``):
    what ``finetune --resume`` continues and ``gct-surgery verdict`` reads."""
    atomic.make_folder(path.parent, "comparison folder")
    doc = {**plan, "recipe": plan["recipe"].to_dict(), "config": asdict(plan["config"])}
    with writing(path):
        atomic_write_text(path, strict_json(doc) + "\n")


def read_plan(path: Path) -> dict:
    """The plan ``write_plan`` wrote, validated like run.json, with its recipe and config
    rebuilt (the config's ``out``: the folder the plan is in, or above a seed's)."""
    doc = read_json_doc(path, PLAN_FIELDS, ("checkpoint", "recipe", "config", "seeds", "plain"))
    _check_config(path, doc["config"])
    out = path.parent.parent if path.name == SEED_PLAN else path.parent
    try:
        config = TrainConfig(**{**doc["config"], "out": str(out)})
        recipe = recipe_from_dict(doc["recipe"], source=str(doc["recipe"].get("source", "recipe")))
    except (TypeError, UserError) as e:
        raise _damaged_json(path, str(e)) from None
    if doc["seeds"] != "auto" and not isinstance(doc["seeds"], (int, type(None))):
        raise _damaged_json(path, f"seeds is {doc['seeds']!r:.20}")
    doc.pop("history", None)
    return {**doc, "recipe": recipe, "config": config}


def write_arm_result(result: RunResult) -> None:
    """``result.json`` in a finished arm's folder: a resumed comparison reads it back
    instead of running the arm again."""
    path = Path(result.run_dir) / ARM_RESULT
    with writing(path):
        doc = {"result": result.to_dict(), "rows": result.rows}
        atomic_write_text(path, strict_json(doc) + "\n")


def read_arm_result(run_dir: Path) -> RunResult | None:
    """The finished arm's result, or None when the arm has not finished."""
    path = Path(run_dir) / ARM_RESULT
    if not path.is_file():
        return None
    doc = read_json_doc(path, {"result": dict, "rows": list}, ("result", "rows"))
    r = doc["result"]
    nan = float("nan")  # strict JSON wrote a missing number as null
    rows = [{k: nan if v is None else v for k, v in row.items()} for row in doc["rows"]]
    try:
        return RunResult(Path(run_dir), rows, r["best"], float(r["seconds"]), int(r["params"]),
                         int(r["gate_params"]), int(r["trainable_params"]), data=dict(r["data"]),
                         nonfinite_skipped=int(r["nonfinite_skipped"]),
                         metric_names=tuple(r["metric_names"]), primary_metric=str(r["primary_metric"]),
                         higher_is_better=bool(r["higher_is_better"]), stages=list(r["stages"]),
                         val_samples=int(r["val_samples"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _damaged_json(path, f"result: {e}") from None


def write_per_image(run_dir: Path, values, metric: str) -> None:
    """``per_image.safetensors``: one row per validation image, in the set's order."""
    from safetensors.torch import save

    data = save({"values": values.contiguous()}, metadata={"metric": metric})
    atomic.atomic_write_bytes(Path(run_dir) / PER_IMAGE, data)


def read_per_image(run_dir: Path):
    """The per-image rows a finished run kept (a float64 numpy array), or None."""
    path = Path(run_dir) / PER_IMAGE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))["values"]
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise RunError(f"{path} is damaged ({str(e)[:80]}); run that arm again with a new "
                       "--out") from None
