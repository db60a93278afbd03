"""A run extended when it resumes: ``finetune --resume RUN --epochs N``.

The stages not yet finished take ``N`` epochs each: the stage in progress (never fewer
than it has already done) and the ones after it. A finished run's last stage is the
stage in progress (its epochs are all done), so a finished run extends its last stage
and continues it, with its optimizer state. The cosine keeps its warm-up and is
stretched to the new length from where it stands.

The new recipe replaces the one in ``run.json`` (what every later resume reads), and
``run.json``'s ``history`` says when and how the run was extended. Everything else a
run records (learning rates, batch size, seed, data layout...) is fixed: asking to
change it on a resume is refused, naming the option (``refuse_fixed``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from ..errors import UserError
from .config import ema_decay_for
from .outputs import read_run_info, read_run_json, record_extension
from .recipe import Recipe


def refuse_fixed(options: Iterable[str], fixed_by: Path) -> None:
    """Options given with ``--resume`` that the run's record fixes: one line naming the
    first, where it is fixed, and what to do instead."""
    for option in options:
        raise UserError(f"{option} cannot change when resuming: {fixed_by} fixes it; start a "
                        f"new run with -o NEW_DIR (with --resume only --epochs, --data, --strict "
                        f"and --skip-nonfinite may be given)")


def extended(recipe: Recipe, epochs: int, from_stage: int) -> Recipe:
    """``recipe`` with ``epochs`` epochs in every stage from ``from_stage`` on."""
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: give a whole number of 1 or more")
    return Recipe(tuple(replace(s, epochs=epochs) if i >= from_stage else s
                        for i, s in enumerate(recipe.stages)), recipe.source)


def check_extension(state: dict, before: Recipe, after: Recipe, run_dir: Path) -> None:
    """The new recipe keeps the finished stages and gives the stage in progress at least
    the epochs it has done."""
    i, done, step = (int(state[k]) for k in ("stage_index", "epoch", "step_in_epoch"))
    if before.stages[:i] != after.stages[:i] or len(before.stages) != len(after.stages):
        raise UserError(f"{run_dir} has finished stages the new epochs would change; start a new "
                        "run with -o NEW_DIR")
    least = done + (1 if step else 0)
    stage = after.stages[i]
    if stage.epochs < least:
        raise UserError(f"--epochs {stage.epochs}: stage {stage.name!r} of {run_dir} has already "
                        f"{'started' if step else 'done'} epoch {least}; give --epochs {least} or more")


def fit_scheduler(state: dict, recipe: Recipe, steps_per_epoch: int | None) -> None:
    """The saved scheduler of the stage in progress, stretched to the stage's epochs in
    ``recipe`` (a no-op unless the run was extended): the cosine's length is
    ``epochs x steps``; its warm-up stays as it was."""
    saved = state.get("scheduler")
    if not steps_per_epoch or not isinstance(saved, dict) or "t_initial" not in saved:
        return
    if int(state["stage_index"]) < len(recipe.stages) and state["stage_step"]:
        stage = recipe.stages[int(state["stage_index"])]  # an update takes grad_accum batches
        saved["t_initial"] = stage.epochs * (steps_per_epoch // stage.grad_accum)


def extend_run(run_dir: Path, state: dict, epochs: int,
               new_recipe: Callable[[Recipe], Recipe] | None = None, *,
               record: bool = True) -> Recipe:
    """Give the run in ``run_dir`` its extended recipe (by default: ``epochs`` in every
    stage from the one in progress on), checked against ``state`` and recorded in
    run.json (``record=False``: checked only). An EMA whose decay followed the run's
    length keeps the decay it had."""
    config, before, _ = read_run_info(run_dir, {})
    after = (new_recipe or (lambda r: extended(r, epochs, int(state["stage_index"]))))(before)
    check_extension(state, before, after, run_dir)
    if not record:
        return after
    changes = {}
    steps = steps_per_epoch(run_dir)
    if config.ema and config.ema_decay is None and steps:
        changes["ema_decay"] = ema_decay_for(config, sum(steps // s.grad_accum * s.epochs for s in before.stages))
    record_extension(Path(run_dir) / "run.json", after, epochs=epochs, config_changes=changes)
    return after


def steps_per_epoch(run_dir: Path) -> int | None:
    """The steps of an epoch, as run.json recorded them at the start."""
    return (read_run_json(run_dir).get("data") or {}).get("steps_per_epoch")
