"""The honest comparison: did the gates help, by how much, and how sure is that?

For every seed, runs of the *same* recipe from the same checkpoint: the same stages, the
same steps at the same learning rates, the same head and BatchNorm handling, the same
data order and augmentation (each stage draws from its own seed):

``gct``
    the gated model, as ``finetune`` trains it;
``control``
    ``static`` (the default): the same gated model with every gate's gamma held at 0
    (zero, never trained, in no optimizer group), so each gate is a fixed per-channel
    scale 1 + tanh(beta) that trains where GCT's gates train and folds into its conv at
    export (``core/fold.py``), leaving a plain model. The one difference between the
    arms is GCT's context term, which is what a user pays for at inference.
    ``identity``: the gates removed; a stage where it would then train nothing trains
    BatchNorm's affine weight and bias at the base learning rate instead, so the steps
    still match.

Optionally ``plain``: one full stage of every parameter for the recipe's total epochs,
without gates, with the recipe's BatchNorm handling and the head's learning rate: the
fine-tune a user would otherwise run. GCT minus plain measures the staged protocol and
the gates together.

The verdict (``verdict.py``) pairs the arms image by image at the final epoch of each run
(``per_image.safetensors``; choosing the best epoch on the validation set would favour
whichever run had more epochs to pick from); the best epochs are reported too. Seeds are
a count, or ``auto``: paired seeds are added, at least 2, until ``verdict.should_stop``
says so, each look spending its share of the error rate.

Files: ``OUT/comparison-run.json`` (the plan: ``finetune --resume OUT`` continues it),
``OUT/seed-S/seed.json`` (that seed's plan), each finished arm's ``result.json`` and the
verdict's ``comparison.json`` and ``metrics.png``. ``--seed-index K`` runs one seed alone
into ``OUT/seed-S/`` and writes nothing else, so jobs on many machines never share a file;
``comparison_verdict(OUT)`` (``gct-surgery verdict OUT``) reads the seeds present. Under
torchrun every rank trains each arm in turn; rank 0 checks, writes and decides.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from ..core.surgery import remove
from ..errors import UserError
from ..io.trust import remember, require
from . import distributed, lock
from .comparison import (Comparison, Plan, SeedRuns, paired_verdict, plain_recipe,
                         task_reduce)
from .config import RunResult, TrainConfig, resume_overrides
from .extend import extend_run, extended, refuse_fixed
from .faults import RunError
from .loop import finetune, log_event, resume, run_recipe
from .outputs import (COMPARISON_PLAN, SEED_PLAN, read_arm_result, read_plan, record_extension,
                      write_arm_result, write_comparison, write_plan)
from .progress import STATE_FILE, read_state
from .recipe import Recipe
from .run import Event
from .verdict import Verdict, should_stop
from .world import load_for_training


def finetune_control(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
                     control: str = "static", on_event: Event | None = None) -> RunResult:
    """``recipe`` on the checkpoint's model as a comparison's control: gamma held at 0
    (``static``) or the gates removed (``identity``, and always for the ``plain`` arm)."""
    with lock.new_run(config.out):
        loaded = load_for_training(checkpoint)
        arm = config.arm if config.arm != "gct" else "control"
        if arm == "plain" or control == "identity":
            remove(loaded.model)
            meta = replace(loaded.meta, gate={}, gated=[]).with_event("remove_gates", arm=arm)
            what = "gates removed"
        else:  # run_recipe holds gamma at 0 for every arm but gct
            meta, what = loaded.meta.with_event("hold_gamma", arm=arm), "gamma held at 0"
        return run_recipe(loaded.model, meta, recipe, replace(config, arm=arm), on_event or log_event,
                          state=None, source=f"{checkpoint} ({what}: {arm})")


def check_at_identity(checkpoint: str | Path) -> None:
    """A comparison starts from gates as injected: a control built from trained gates
    (removed, or gamma zeroed) would be another model than GCT's starting point."""
    from ..core.movement import gate_movement

    m = gate_movement(load_for_training(checkpoint).model)
    if m.max_abs_gamma or m.max_abs_beta or m.max_abs_alpha_shift:
        raise UserError(f"{checkpoint} has gates away from identity (max |gamma| "
                        f"{m.max_abs_gamma:.3g}, max |beta| {m.max_abs_beta:.3g}, max |alpha - 1| "
                        f"{m.max_abs_alpha_shift:.3g}), so GCT and its control would not start "
                        "from the same model: start from the injected file (gct-surgery inject)")


def compare(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
            seeds: int | str | None = 1, max_seeds: int = 10, plain: bool = False,
            control: str = "static", resolution: float | None = None,
            seed_index: int | None = None, on_event: Event | None = None) -> Comparison:
    """GCT and its control (and the plain reference) for ``seeds`` seeds (or ``"auto"``, up
    to ``max_seeds``), then the verdict. Runs go to ``OUT/seed-S/{gct,control,plain}``;
    ``OUT/comparison.json`` and ``OUT/metrics.png`` hold the verdict and the curves.
    Interrupted, it continues with ``resume_comparison(OUT)``. ``seed_index``: run seed
    ``config.seed + seed_index`` alone and write only its folder."""
    remember(config.task)  # a task the caller chose; a resume's recorded one asks first
    plan = Plan(str(checkpoint), recipe, config, seeds, max_seeds, plain, control, resolution)
    distributed.init(distributed.device_for(config.device))
    task_reduce(plan)
    check_at_identity(checkpoint)
    out = Path(config.out)
    if seed_index is not None:
        return _seed_job(plan, seed_index, on_event)
    with lock.hold(out, what="comparison"):
        _refuse(_occupied(out) if _main() else None)
        if _main():
            write_plan(out / COMPARISON_PLAN, plan.doc())
        return _run_seeds(plan, on_event, {})


def _occupied(out: Path) -> str | None:
    if (out / COMPARISON_PLAN).exists():
        return (f"{out} already holds a comparison; continue it with --resume {out} or choose "
                "another --out")
    if (out / STATE_FILE).exists():
        return f"{out} already holds a run; choose another --out"
    if any(out.glob(f"seed-*/{SEED_PLAN}")):
        return (f"{out} holds seeds run with --seed-index; add seeds the same way, or choose "
                "another --out")
    return None


def _seed_job(plan: Plan, index: int, on_event: Event | None) -> Comparison:
    if plan.seeds == "auto" or index < 0 or (plan.seeds is not None and index >= plan.seeds):
        raise UserError(f"--seed-index {index}: give 0 to --seeds minus 1 (a fixed number of "
                        "seeds; --seeds auto adds seeds one after another in one job)")
    out, seed = Path(plan.config.out), plan.config.seed + index
    folder = out / f"seed-{seed}"
    with lock.hold(folder, what="seed"):  # this seed's folder only: jobs of other seeds run on
        taken = None
        if (out / COMPARISON_PLAN).exists():
            taken = f"{out} holds a whole comparison; continue it with --resume {out}"
        elif (folder / SEED_PLAN).exists():
            taken = f"{folder} already holds seed {seed}; continue it with --resume {folder}"
        _refuse(taken if _main() else None)
        return _one_seed(plan, seed, index, on_event, {})


def _one_seed(plan: Plan, seed: int, index: int, on_event: Event | None,
              overrides: dict) -> Comparison:
    runs = [_run_seed(plan, seed, index, on_event, overrides, alone=True)]
    v = pv = None
    if _main():
        v, pv = paired_verdict(plan, runs), paired_verdict(plan, runs, "plain")
    return Comparison(Path(plan.config.out), runs, v, pv, runs[0].gct.primary_metric, plan.control,
                      files=False)


def _refuse(problem: str | None) -> None:
    """Rank 0 checked the folder; every rank stops when it refused."""
    if distributed.broadcast_flag(problem is not None):
        raise RunError(problem or "rank 0 refused the comparison folder (its message says why)")


def _main() -> bool:
    """Rank 0 (or the one process): it checks folders, writes files and decides."""
    return int(os.environ.get("RANK", "0")) == 0


def resume_comparison(out: str | Path, *, on_event: Event | None = None, data: str | None = None,
                      strict: bool | None = None, skip_nonfinite: int | None = None,
                      epochs: int | None = None, fixed: Iterable[str] = ()) -> Comparison:
    """Continue an interrupted comparison (or one ``--seed-index`` seed of one, from its
    folder): finished arms are read back, the interrupted one resumes, the rest start;
    then the verdict. ``data``, ``strict`` and ``skip_nonfinite`` may be changed, as for
    ``resume``; ``epochs`` extends every arm alike (``_extend``); ``fixed`` options are
    refused by name."""
    out = Path(out)
    path = out / (COMPARISON_PLAN if (out / COMPARISON_PLAN).is_file() else SEED_PLAN)
    refuse_fixed(fixed, path)
    overrides = resume_overrides(data=data, strict=strict, skip_nonfinite=skip_nonfinite)
    with lock.hold(out, create=False, what="comparison"):
        doc = read_plan(path)
        require(doc["config"].task, named_by=str(path), what="a task")
        plan = Plan(**{k: v for k, v in doc.items() if k in Plan.__dataclass_fields__})
        distributed.init(distributed.device_for(plan.config.device))
        if epochs is not None:
            seeds = ([path.parent] if path.name == SEED_PLAN else
                     [out / f"seed-{plan.config.seed + i}" for i in range(plan.count)])
            plan = _extend(plan, seeds, epochs)
        plan = replace(plan, config=replace(plan.config, **overrides))
        if path.name == SEED_PLAN:
            return _one_seed(plan, doc["seed"], doc["index"], on_event, overrides)
        return _run_seeds(plan, on_event, overrides)


def _extend(plan: Plan, folders: list[Path], epochs: int) -> Plan:
    """Every arm gets the same new recipe: ``epochs`` in each stage from the furthest
    stage any arm has reached (the plain arm: the new total), checked for every arm
    before any is changed; then each run.json and the plans record it."""
    names = ("gct", "control", *(("plain",) if plan.plain else ()))
    arms = [f / arm for f in folders for arm in names]
    states = {f: read_state(f) for f in arms if (f / STATE_FILE).exists()}
    start = max((int(s["stage_index"]) for f, s in states.items() if f.name != "plain"), default=0)
    after = extended(plan.recipe, epochs, start)

    def arm_recipe(folder: Path):
        if folder.name == "plain":
            return lambda r: extended(r, after.total_epochs, 0)
        return lambda r: extended(r, epochs, start)

    for record in (False, True):
        for folder, state in states.items():
            extend_run(folder, state, epochs, arm_recipe(folder), record=record)
    top = Path(plan.config.out) / COMPARISON_PLAN
    plans = [top] * top.is_file() + [f / SEED_PLAN for f in folders]
    for path in filter(Path.is_file, plans):
        record_extension(path, after, epochs=epochs)
    return replace(plan, recipe=after)


def _run_seeds(plan: Plan, on_event: Event | None, overrides: dict) -> Comparison:
    """Seed after seed; under ``--seeds auto`` a look after each from the second, until
    ``should_stop``. Rank 0 decides and writes; every rank follows its decision."""
    runs: list[SeedRuns] = []
    auto, v, stopped = plan.seeds == "auto", None, ""
    for i in range(plan.count):
        runs.append(_run_seed(plan, plan.config.seed + i, i, on_event, overrides))
        stop = False
        if _main():
            if auto and len(runs) >= 2:
                v = paired_verdict(plan, runs, looks=len(runs) - 1, max_looks=plan.max_seeds - 1)
                stop, stopped = should_stop(v, len(runs), plan.max_seeds)
            _seed_done(on_event, runs[-1], Path(plan.config.out), v, stopped)
        if auto and distributed.broadcast_flag(stop):
            break
    if not _main():
        return Comparison(Path(plan.config.out), runs, None, None, runs[0].gct.primary_metric,
                          plan.control)
    comparison = Comparison(Path(plan.config.out), runs, v if auto else paired_verdict(plan, runs),
                            paired_verdict(plan, runs, "plain"), runs[0].gct.primary_metric,
                            plan.control, stopped)
    write_comparison(comparison)
    return comparison


def _run_seed(plan: Plan, seed: int, index: int, on_event: Event | None,
              overrides: dict, alone: bool = False) -> SeedRuns:
    """One seed's arms into ``OUT/seed-S/``, beside that seed's plan (``alone``: a
    ``--seed-index`` job, which resumes from that folder)."""
    out = Path(plan.config.out)
    folder = out / f"seed-{seed}"
    if _main() and not (folder / SEED_PLAN).exists():
        write_plan(folder / SEED_PLAN, plan.doc(seed=seed, index=index))
    tag = _tagged(on_event, seed, folder if alone else out)

    def arm(name: str, start) -> RunResult:
        config = replace(plan.config, seed=seed, out=str(folder / name), arm=name)
        return _arm_run(start, config, tag(name), overrides, plan.recipe.total_epochs)

    checkpoint, recipe = plan.checkpoint, plan.recipe
    gct = arm("gct", lambda c, e: finetune(checkpoint, recipe, c, on_event=e))
    control = arm("control", lambda c, e: finetune_control(checkpoint, recipe, c,
                                                           control=plan.control, on_event=e))
    reference = None
    if plan.plain:
        flat = plain_recipe(recipe, new_head=_head_is_new(checkpoint, plan.config.num_classes))
        reference = arm("plain", lambda c, e: finetune_control(checkpoint, flat, c, on_event=e))
    return SeedRuns(seed, gct, control, reference)


def _head_is_new(checkpoint: str, num_classes: int | None) -> bool:
    """Whether the runs replace the checkpoint's head (``--num-classes`` another count)."""
    from ..core.heads import model_num_classes

    if num_classes is None:
        return False
    return model_num_classes(load_for_training(checkpoint).model) != num_classes


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
    if _main():
        write_arm_result(result)
    return result


def _seed_done(on_event: Event | None, runs: SeedRuns, out: Path, v: Verdict | None,
               stopped: str) -> None:
    if on_event is not None:
        key = runs.gct.primary_metric
        finals = {arm: (getattr(runs, arm).last or {}).get(key) for arm in ("gct", "control")}
        on_event("seed_done", {"seed": runs.seed, "metric": key, **finals,
                               "verdict": v.text if v else None, "seeds": v.seeds if v else None,
                               "reason": stopped, "comparison": str(out)})


def _tagged(on_event, seed: int, out: Path):
    """Events of one arm, labelled with the arm, seed and comparison folder so a reporter
    can tell them apart (and say that ``--resume OUT`` continues the whole comparison)."""
    def for_arm(arm: str):
        if on_event is None:
            return None
        return lambda event, info: on_event(event, {**info, "arm": arm, "seed": seed,
                                                    "comparison": str(out)})
    return for_arm


