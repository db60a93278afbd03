"""The honest comparison: did the gates help, by how much, and how sure is that?

For every seed, two runs of the *same* recipe from the same checkpoint:

``gct``
    the gated model, as ``finetune`` trains it;
``control``
    the same model with its gates removed (which is what gates held at identity
    compute, bit for bit): the same stages in the same order, the same head
    handling (a new head trains at the same learning rate in the same stages), the
    same BatchNorm handling, the same data order and augmentation. In every stage it
    trains exactly the GCT run's parameters minus the gate parameters; a stage left
    with nothing to train (a gates stage without a new head) changes nothing and its
    rows repeat the model's metrics.

GCT minus control, paired by seed, answers "did the gates help" (``verdict.py``).
Optionally a third run, ``plain``: one full stage of every parameter for the recipe's
total epochs, without gates: the fine-tune a user would otherwise run. GCT minus
plain measures the staged protocol *and* the gates together.

The verdict compares the final epoch of each run (no selection on the validation set,
which would favour whichever run had more epochs to pick from); the best epochs are
reported too.

A comparison is resumable as one unit: ``OUT/comparison-run.json`` records what was
asked, each finished arm leaves ``result.json`` in its folder, and
``resume_comparison(OUT)`` (``finetune --resume OUT``) reads the finished arms back,
resumes the one that was interrupted, starts the ones not begun, and writes the
verdict. The comparison folder is locked for the whole time (``lock.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from ..core.surgery import remove
from ..errors import UserError
from . import lock
from .config import RunResult, TrainConfig, resume_overrides
from .extend import extend_run, extended, refuse_fixed
from .faults import RunError
from .loop import finetune, log_event, resume, run_recipe
from .outputs import (COMPARISON_PLAN, read_arm_result, read_comparison_plan, record_extension,
                      write_arm_result, write_comparison_plan)
from .progress import STATE_FILE, read_state
from .recipe import Recipe
from .run import Event
from .stages import Stage
from .verdict import Verdict, paired_verdict
from .world import load_for_training

PERCENT_METRICS = ("top1", "top5")  # accuracies in %: one seed gets a binomial interval


def finetune_control(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
                     on_event: Event | None = None) -> RunResult:
    """``recipe`` on the checkpoint's model with its gates removed (what gates at
    identity compute): a comparison's control, or with a plain recipe its reference."""
    with lock.new_run(config.out):
        loaded = load_for_training(checkpoint)
        remove(loaded.model)
        arm = config.arm if config.arm != "gct" else "control"
        meta = replace(loaded.meta, gate={}, gated=[]).with_event("remove_gates", arm=arm)
        return run_recipe(loaded.model, meta, recipe, replace(config, arm=arm), on_event or log_event,
                          state=None, source=f"{checkpoint} (gates removed: {arm})")


def plain_recipe(recipe: Recipe) -> Recipe:
    """One full stage for the recipe's total epochs, with its (last) full stage's
    settings: every parameter, the base at its learning rate."""
    full = next((s for s in reversed(recipe.stages) if s.kind == "full"), None) or Stage("plain", "full")
    epochs = sum(s.epochs for s in recipe.stages)
    stage = replace(full, name="plain", kind="full", epochs=epochs, train_head=False,
                    train_bn=False, freeze_bn=None, base_lr=full.effective_base_lr)
    return Recipe((stage,), f"{recipe.source} (plain: one full stage of {epochs} epoch{'s' if epochs != 1 else ''})")


@dataclass
class SeedRuns:
    seed: int
    gct: RunResult
    control: RunResult
    plain: RunResult | None = None

    def to_dict(self) -> dict:
        d = {"seed": self.seed, "gct": _arm(self.gct), "control": _arm(self.control)}
        if self.plain is not None:
            d["plain"] = _arm(self.plain)
        return d


def _arm(r: RunResult) -> dict:
    return {"run_dir": str(r.run_dir), "stages": r.stages, "best": r.best, "final": r.last,
            "seconds": round(r.seconds, 3), "params": r.params, "gate_params": r.gate_params}


@dataclass
class Comparison:
    out: Path
    runs: list[SeedRuns]
    verdict: Verdict
    plain_verdict: Verdict | None
    metric: str

    def to_dict(self) -> dict:
        d = {"out": str(self.out), "compared": "final epoch", "metric": self.metric,
             "verdict": self.verdict.to_dict(), "runs": [r.to_dict() for r in self.runs]}
        if self.plain_verdict is not None:
            d["plain_verdict"] = self.plain_verdict.to_dict()
        return d


def final_score(r: RunResult) -> float:
    return float((r.last or {})[r.primary_metric])


def _verdict(gct: list[RunResult], other: list[RunResult], what: str) -> Verdict:
    first = gct[0]
    v = paired_verdict([final_score(r) for r in gct], [final_score(r) for r in other],
                       metric=first.primary_metric, higher_is_better=first.higher_is_better,
                       samples=first.val_samples, percent=first.primary_metric in PERCENT_METRICS)
    if what == "plain":
        v = replace(v, text=v.text.replace("the same protocol without gates",
                                           "a plain full fine-tune without gates"))
    return v


def compare(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *, seeds: int = 1,
            plain: bool = False, on_event: Event | None = None) -> Comparison:
    """GCT and its control (and the plain reference) for ``seeds`` seeds, then the verdict.

    Runs go to ``OUT/seed-S/{gct,control,plain}``; ``OUT/comparison.json`` and
    ``OUT/metrics.png`` hold the verdict and the curves. Interrupted, it continues
    with ``resume_comparison(OUT)``.
    """
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    out = Path(config.out)
    with lock.hold(out, what="comparison"):
        if (out / COMPARISON_PLAN).exists():
            raise RunError(f"{out} already holds a comparison; continue it with --resume {out} "
                           "or choose another --out")
        if (out / STATE_FILE).exists():
            raise RunError(f"{out} already holds a run; choose another --out")
        write_comparison_plan(out, checkpoint=str(checkpoint), recipe=recipe, config=config,
                              seeds=seeds, plain=plain)
        return _run_arms(str(checkpoint), recipe, config, seeds, plain, on_event, {})


def is_comparison(folder: str | Path) -> bool:
    """True for the folder of a ``--baseline`` comparison (it holds the plan)."""
    return (Path(folder) / COMPARISON_PLAN).is_file()


def resume_comparison(out: str | Path, *, on_event: Event | None = None, data: str | None = None,
                      strict: bool | None = None, skip_nonfinite: int | None = None,
                      epochs: int | None = None, fixed: Iterable[str] = ()) -> Comparison:
    """Continue an interrupted comparison: finished arms are read back, the interrupted
    one resumes, the rest start; then the verdict. ``data``, ``strict`` and
    ``skip_nonfinite`` may be changed, as for ``resume``; ``epochs`` extends every arm
    alike (``_extend``); ``fixed`` options are refused by name."""
    out = Path(out)
    refuse_fixed(fixed, out / COMPARISON_PLAN)
    overrides = resume_overrides(data=data, strict=strict, skip_nonfinite=skip_nonfinite)
    with lock.hold(out, create=False, what="comparison"):
        checkpoint, recipe, config, seeds, plain = read_comparison_plan(out)
        if epochs is not None:
            recipe = _extend(out, recipe, config, seeds, plain, epochs)
        return _run_arms(checkpoint, recipe, replace(config, **overrides), seeds, plain,
                         on_event, overrides)


def _extend(out: Path, recipe: Recipe, config: TrainConfig, seeds: int, plain: bool,
            epochs: int) -> Recipe:
    """Every arm gets the same new recipe: ``epochs`` in each stage from the furthest
    stage any arm has reached (the plain arm: the new total), checked for every arm
    before any is changed; then each run.json and the plan record it."""
    folders = [out / f"seed-{config.seed + i}" / arm for i in range(seeds)
               for arm in ("gct", "control", *(("plain",) if plain else ()))]
    states = {f: read_state(f) for f in folders if (f / STATE_FILE).exists()}
    start = max((int(s["stage_index"]) for f, s in states.items() if f.name != "plain"), default=0)
    after = extended(recipe, epochs, start)

    def arm_recipe(folder: Path):
        if folder.name == "plain":
            return lambda r: extended(r, after.total_epochs, 0)
        return lambda r: extended(r, epochs, start)

    for record in (False, True):
        for folder, state in states.items():
            extend_run(folder, state, epochs, arm_recipe(folder), record=record)
    record_extension(out / COMPARISON_PLAN, after, epochs=epochs)
    return after


def _run_arms(checkpoint: str, recipe: Recipe, config: TrainConfig, seeds: int, plain: bool,
              on_event: Event | None, overrides: dict) -> Comparison:
    out = Path(config.out)
    results: list[SeedRuns] = []
    for i in range(seeds):
        seed = config.seed + i
        folder = out / f"seed-{seed}"

        def arm_config(arm: str) -> TrainConfig:
            return replace(config, seed=seed, out=str(folder / arm), arm=arm)

        tag = _tagged(on_event, seed, out)
        gct = _arm_run(lambda c, e: finetune(checkpoint, recipe, c, on_event=e),
                       arm_config("gct"), tag("gct"), overrides, recipe.total_epochs)
        control = _arm_run(lambda c, e: finetune_control(checkpoint, recipe, c, on_event=e),
                           arm_config("control"), tag("control"), overrides, recipe.total_epochs)
        reference = (_arm_run(lambda c, e: finetune_control(checkpoint, plain_recipe(recipe), c, on_event=e),
                              arm_config("plain"), tag("plain"), overrides, recipe.total_epochs)
                     if plain else None)
        results.append(SeedRuns(seed, gct, control, reference))
    verdict = _verdict([r.gct for r in results], [r.control for r in results], "control")
    plain_verdict = (_verdict([r.gct for r in results], [r.plain for r in results], "plain")
                     if plain else None)
    comparison = Comparison(out, results, verdict, plain_verdict, results[0].gct.primary_metric)
    from .outputs import write_comparison

    write_comparison(comparison)
    return comparison


def _arm_run(start, config: TrainConfig, on_event: Event | None, overrides: dict,
             epochs: int) -> RunResult:
    """A finished arm's result read back, an interrupted (or extended: fewer than
    ``epochs`` rows) one resumed, or a new one run; a finished arm leaves ``result.json``
    for the next resume."""
    folder = Path(config.out)
    result = read_arm_result(folder)
    if result is not None and len(result.rows) == 1 + epochs:
        if on_event is not None:
            on_event("arm_done", {"run_dir": str(folder)})
        return result
    if (folder / STATE_FILE).exists():
        result = resume(folder, on_event=on_event, **overrides)
    else:
        result = start(config, on_event)
    write_arm_result(result)
    return result


def _tagged(on_event, seed: int, out: Path):
    """Events of one arm, labelled with the arm, seed and comparison folder so a reporter
    can tell them apart (and say that ``--resume OUT`` continues the whole comparison)."""
    def for_arm(arm: str):
        if on_event is None:
            return None
        return lambda event, info: on_event(event, {**info, "arm": arm, "seed": seed,
                                                    "comparison": str(out)})
    return for_arm
