"""GCT against its control on the same budget, seed by seed, and the verdict.

Per seed the same recipe runs from the same checkpoint as ``gct`` and as the ``control``
(``static``: gamma held at 0; ``identity``: the gates removed), and optionally ``plain``
(one full stage without gates). docs/finetuning.md ("The comparison") says what each
arm trains; ``verdict.py`` holds the statistics. A ``--seed-index`` job writes only its
``OUT/seed-S/``, so jobs on many machines share ``OUT``; ``comparison_verdict(OUT)``
reads the seeds present. Under torchrun every rank trains each arm; rank 0 checks,
writes and decides.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

from ..core.fold import gate_movement
from ..core.model import model_num_classes
from ..core.surgery import remove
from ..errors import UserError
from ..io.trust import remember, require
from . import distributed
from .config import RunResult, TrainConfig, resume_overrides
from .distributed import is_main_process
from .faults import RunError
from .loop import finetune, load_for_training, log_event, resume, run_recipe
from .outputs import (COMPARISON_PLAN, SEED_PLAN, RunDir, hold, new_run, read_arm_result,
                      read_per_image, read_plan, record_extension, write_arm_result,
                      write_comparison, write_plan)
from .recipe import Recipe
from .state import Event, extend_run, extended, read_state, refuse_fixed
from .stages import Stage
from .task import load_task
from .verdict import Verdict, default_resolution, should_stop, verdict

# What may differ between the seeds of one design (the machine, where the data lies).
PER_MACHINE = ("seed", "out", "data", "workers", "threads", "device", "class_map",
               "metrics_format", "save_every", "strict", "skip_nonfinite")


@dataclass(frozen=True)
class Plan:
    """What a comparison is asked: the design every seed shares."""

    checkpoint: str
    recipe: Recipe
    config: TrainConfig
    seeds: int | str | None = 1    # a count, "auto", or None (a --seed-index job, total unsaid)
    max_seeds: int = 10
    plain: bool = False
    control: str = "static"
    resolution: float | None = None  # None: the metric's default (verdict.default_resolution)

    def __post_init__(self) -> None:
        count = self.seeds in ("auto", None) or isinstance(self.seeds, int) and self.seeds >= 1
        refusals = ((not count, f"--seeds {self.seeds}: give a whole number of 1 or more, or auto"),
                    (self.seeds == "auto" and self.max_seeds < 2,
                     f"--max-seeds {self.max_seeds}: --seeds auto needs 2 or more"),
                    (self.resolution is not None and not self.resolution > 0,
                     f"--resolution {self.resolution}: give a difference above 0"))
        for refused, why in refusals:
            if refused:
                raise UserError(why)

    @classmethod
    def read(cls, path: Path) -> tuple[Plan, dict]:
        """A plan file as a ``Plan``, and the file's whole record (a seed's ``seed``)."""
        doc = read_plan(path)
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc}), doc

    def doc(self, **more) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, **more}

    @property
    def count(self) -> int:
        return self.max_seeds if self.seeds == "auto" else (self.seeds or 1)

    def folder(self, index: int) -> Path:
        return Path(self.config.out) / f"seed-{self.config.seed + index}"


def plain_recipe(recipe: Recipe, new_head: bool = False) -> Recipe:
    """One full stage for the recipe's total epochs with its (last) full stage's settings
    and BatchNorm handling; a head the recipe trains in a gates or head stage (a
    ``new_head`` in every gates stage) keeps that stage's learning rate."""
    full = next((s for s in reversed(recipe.stages) if s.kind == "full"), Stage("plain", "full"))
    head = next((s for s in recipe.stages if s.kind == "head"
                 or (s.kind == "gates" and (s.train_head or new_head))), None)
    stage = replace(full, name="plain", kind="full", epochs=recipe.total_epochs,
                    train_head=False, train_bn=False, freeze_bn=full.bn_frozen,
                    base_lr=full.effective_base_lr, head_lr=head.lr if head is not None else None)
    head_lr = stage.head_lr if stage.head_lr is not None else stage.effective_base_lr
    label = (f"plain: one full stage of {stage.epochs} epoch{'s' if stage.epochs != 1 else ''}, "
             f"BN statistics {'frozen' if stage.bn_frozen else 'updating'}, the head at lr "
             f"{head_lr:g}")
    return Recipe((stage,), f"{recipe.source} ({label})")


@dataclass
class SeedRuns:
    seed: int
    gct: RunResult
    control: RunResult
    plain: RunResult | None = None

    @property
    def arms(self) -> dict[str, RunResult]:
        """The arms that ran, by name (``plain`` only with --plain)."""
        return {a: getattr(self, a) for a in ("gct", "control", "plain")
                if getattr(self, a) is not None}

    def to_dict(self) -> dict:
        return {"seed": self.seed, **{a: {
            "run_dir": str(r.run_dir), "stages": r.stages, "best": r.best, "final": r.last,
            "seconds": round(r.seconds, 3), "params": r.params, "gate_params": r.gate_params}
            for a, r in self.arms.items()}}


@dataclass
class Comparison:
    out: Path
    runs: list[SeedRuns]
    verdict: Verdict | None = None    # None on a torchrun rank other than 0
    plain_verdict: Verdict | None = None
    control: str = "static"
    stopped: str = ""                 # why --seeds auto stopped
    missing: list[int] | None = None  # gct-surgery verdict: seeds not (yet) finished
    files: bool = True                # comparison.json and metrics.png written (not a seed job)

    @property
    def metric(self) -> str:
        return self.runs[0].gct.primary_metric

    def to_dict(self) -> dict:
        optional = {"stopped": self.stopped or None, "missing_seeds": self.missing,
                    "plain_verdict": self.plain_verdict and self.plain_verdict.to_dict()}
        return {"out": str(self.out), "compared": "final epoch, image by image",
                "metric": self.metric, "control": self.control,
                "verdict": self.verdict.to_dict() if self.verdict else None,
                "runs": [r.to_dict() for r in self.runs],
                **{k: v for k, v in optional.items() if v is not None}}


def paired_verdict(plan: Plan, runs: list[SeedRuns], other: str = "control") -> Verdict | None:
    """GCT minus ``other`` image by image over the seeds (None: no ``other`` arm). Under
    ``--seeds auto`` the control's verdict is a look (one after each seed from the second)
    that spends its share of alpha."""
    if getattr(runs[0], other) is None:
        return None
    looks, max_looks = ((len(runs) - 1, plan.max_seeds - 1) if plan.seeds == "auto"
                        and other == "control" and len(runs) >= 2 else (1, None))
    arrays = [[_per_image(getattr(r, arm)) for r in runs] for arm in ("gct", other)]
    metric = runs[0].gct.primary_metric
    try:
        v = verdict(*arrays, metric=metric, higher_is_better=runs[0].gct.higher_is_better,
                    resolution=plan.resolution or default_resolution(metric),
                    reduce=task_reduce(plan) if arrays[0][0].ndim > 1 else None,
                    looks=looks, max_looks=max_looks)
    except ValueError as e:
        raise RunError(f"{plan.config.out}: the arms' per-image results cannot be paired ({e}); "
                       "every seed must score the same validation images") from None
    if other == "plain":
        trained = runs[0].plain.stages[0].get("trained", "every parameter")
        bn = "frozen" if plain_recipe(plan.recipe).stages[0].bn_frozen else "updating"
        v = replace(v, text=f"against the plain fine-tune ({trained}; BN statistics {bn}): "
                            + v.text.replace(" control", " the plain fine-tune"))
    return v


def _per_image(result: RunResult):
    values = read_per_image(result.run_dir)
    if values is None:
        raise RunError(f"{result.run_dir} has no per-image results (per_image.safetensors): it "
                       "finished before they were kept; run the comparison again with a new --out")
    return values


def task_reduce(plan: Plan):
    """The task's ``reduce`` (None: per-image values are averaged); refused up front when
    the task has no ``per_image``, which the verdict pairs."""
    task = load_task(plan.config.task, plan.config)
    if not callable(getattr(task, "per_image", None)):
        raise UserError(f"--task {plan.config.task} has no per_image(output, target), which "
                        "--baseline needs to pair the arms image by image; add it "
                        "(docs/finetuning.md, 'Models that are not classifiers')")
    return getattr(task, "reduce", None)


# --- running the arms ---------------------------------------------------------------------

def finetune_control(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
                     control: str = "static", on_event: Event | None = None) -> RunResult:
    """``recipe`` on the checkpoint's model as a comparison's control: gamma held at 0
    (``static``) or the gates removed (``identity``, and always for the ``plain`` arm)."""
    with new_run(config.out):
        loaded, arm = load_for_training(checkpoint), config.arm  # "control" or "plain"
        if arm == "plain" or control == "identity":
            remove(loaded.model)
            meta = replace(loaded.meta, gate={}, gated=[]).with_event("remove_gates", arm=arm)
            what = "gates removed"
        else:  # run_recipe holds gamma at 0 for every arm but gct
            meta, what = loaded.meta.with_event("hold_gamma", arm=arm), "gamma held at 0"
        return run_recipe(loaded.model, meta, recipe, config, on_event or log_event, state=None,
                          source=f"{checkpoint} ({what}: {arm})")


def compare(checkpoint: str | Path, recipe: Recipe, config: TrainConfig, *,
            seeds: int | str | None = 1, max_seeds: int = 10, plain: bool = False,
            control: str = "static", resolution: float | None = None,
            seed_index: int | None = None, on_event: Event | None = None) -> Comparison:
    """GCT and its control (and the plain reference) for ``seeds`` seeds (or ``"auto"``, up
    to ``max_seeds``), then the verdict. Runs go to ``OUT/seed-S/{gct,control,plain}``.
    Interrupted, it continues with ``resume_comparison(OUT)``. ``seed_index``: run seed
    ``config.seed + seed_index`` alone and write only its folder."""
    remember(config.task)  # a task the caller chose; a resume's recorded one asks first
    plan = Plan(str(checkpoint), recipe, config, seeds, max_seeds, plain, control, resolution)
    if seed_index is not None and (seeds == "auto" or seed_index < 0 or (
            seeds is not None and seed_index >= plan.count)):
        raise UserError(f"--seed-index {seed_index}: give 0 to --seeds minus 1 (a fixed number "
                        "of seeds; --seeds auto adds seeds one after another in one job)")
    distributed.init(distributed.device_for(config.device))
    task_reduce(plan)
    # from gates as injected: a control built from trained gates (removed, or gamma zeroed)
    # would be another model than GCT's starting point
    m = gate_movement(load_for_training(checkpoint).model)
    if m.max_abs_gamma or m.max_abs_beta or m.max_abs_alpha_shift:
        raise UserError(f"{checkpoint} has gates away from identity (max |gamma| "
                        f"{m.max_abs_gamma:.3g}, max |beta| {m.max_abs_beta:.3g}, max |alpha - 1| "
                        f"{m.max_abs_alpha_shift:.3g}), so GCT and its control would not start "
                        "from the same model: start from the injected file (gct-surgery inject)")
    out = Path(config.out)
    folder = out if seed_index is None else plan.folder(seed_index)
    # a seed job locks only its seed's folder: jobs of other seeds run on
    with hold(folder, what="comparison" if seed_index is None else "seed"):
        problem = _occupied(out, folder) if is_main_process() else None
        if distributed.broadcast_flag(problem is not None):  # every rank stops when rank 0 refused
            raise RunError(problem or "rank 0 refused the comparison folder (its message says why)")
        if seed_index is None and is_main_process():
            write_plan(out / COMPARISON_PLAN, plan.doc())
        return _run_seeds(plan, on_event, {}, seed_index)


def _occupied(out: Path, folder: Path) -> str | None:
    """Why ``out`` (or a seed job's ``folder``) cannot take this comparison, if it cannot."""
    whole = folder == out
    refusals = (
        ((out / COMPARISON_PLAN).exists(), f"{out} already holds a comparison; continue it with "
                                           f"--resume {out} or choose another --out"),
        (not whole and (folder / SEED_PLAN).exists(),
         f"{folder} already holds that seed; continue it with --resume {folder}"),
        (whole and (out / RunDir.STATE).exists(),
         f"{out} already holds a run; choose another --out"),
        (whole and any(out.glob(f"seed-*/{SEED_PLAN}")), f"{out} holds seeds run with "
         "--seed-index; add seeds the same way, or choose another --out"))
    return next((why for refused, why in refusals if refused), None)


def resume_comparison(out: str | Path, *, on_event: Event | None = None, data: str | None = None,
                      strict: bool | None = None, skip_nonfinite: int | None = None,
                      epochs: int | None = None, fixed: Iterable[str] = ()) -> Comparison:
    """Continue an interrupted comparison, or one seed of one from its folder; then the
    verdict. Options as for ``resume``; ``epochs`` extends every arm alike (``_extend``)."""
    out = Path(out)
    path = out / (COMPARISON_PLAN if (out / COMPARISON_PLAN).is_file() else SEED_PLAN)
    refuse_fixed(fixed, str(path))
    overrides = resume_overrides(data=data, strict=strict, skip_nonfinite=skip_nonfinite)
    with hold(out, create=False, what="comparison"):
        plan, doc = Plan.read(path)
        require(plan.config.task, named_by=str(path), what="a task")
        distributed.init(distributed.device_for(plan.config.device))
        only = doc["index"] if path.name == SEED_PLAN else None
        if epochs is not None:
            plan = _extend(plan, [plan.folder(i) for i in (
                range(plan.count) if only is None else (only,))], epochs)
        plan = replace(plan, config=replace(plan.config, **overrides))
        return _run_seeds(plan, on_event, overrides, only)


def _extend(plan: Plan, folders: list[Path], epochs: int) -> Plan:
    """Every arm gets the same new recipe: ``epochs`` in each stage from the furthest
    stage any arm has reached (the plain arm: the new total), checked for every arm
    before any is changed; then the plans record it."""
    names = ("gct", "control", *(("plain",) if plan.plain else ()))
    states = {f / arm: read_state(f / arm) for f in folders for arm in names
              if (f / arm / RunDir.STATE).exists()}
    start = max((int(s["stage_index"]) for f, s in states.items() if f.name != "plain"), default=0)
    after = extended(plan.recipe, epochs, start)
    for record in (False, True):  # every arm checked before any is changed
        for folder, state in states.items():
            more, first = (after.total_epochs, 0) if folder.name == "plain" else (epochs, start)
            extend_run(folder, state, epochs, lambda r: extended(r, more, first), record=record)
    plans = [Path(plan.config.out) / COMPARISON_PLAN, *(f / SEED_PLAN for f in folders)]
    for path in filter(Path.is_file, plans) if is_main_process() else ():
        record_extension(path, after, epochs=epochs)
    return replace(plan, recipe=after)


def _run_seeds(plan: Plan, on_event: Event | None, overrides: dict,
               only: int | None = None) -> Comparison:
    """Seed after seed (``only``: that seed's index alone, a ``--seed-index`` job, which
    writes nothing outside its folder); under ``--seeds auto`` a look after each from the
    second, until ``should_stop``. Rank 0 decides and writes; every rank follows."""
    runs: list[SeedRuns] = []
    auto, main = plan.seeds == "auto" and only is None, is_main_process()
    v, stopped, stop = None, "", False
    classes = plan.config.num_classes  # a head that --num-classes replaces: the head stage's lr
    flat = plain_recipe(plan.recipe, new_head=classes is not None and classes != model_num_classes(
        load_for_training(plan.checkpoint).model)) if plan.plain else None
    for i in range(plan.count) if only is None else (only,):
        runs.append(_run_seed(plan, i, on_event, overrides, flat, alone=only is not None))
        if main and auto and len(runs) >= 2:
            v = paired_verdict(plan, runs)
            stop, stopped = should_stop(v, plan.max_seeds)
        if main and on_event is not None:
            metric, last = runs[0].gct.primary_metric, runs[-1]
            on_event("seed_done", {
                "seed": last.seed, "metric": metric, "gct": (last.gct.last or {}).get(metric),
                "control": (last.control.last or {}).get(metric), "verdict": v.text if v else None,
                "seeds": v.seeds if v else None, "reason": stopped, "comparison": plan.config.out})
        if auto and distributed.broadcast_flag(stop):
            break
    verdicts = ((v if auto else paired_verdict(plan, runs), paired_verdict(plan, runs, "plain"))
                if main else (None, None))
    comparison = Comparison(Path(plan.config.out), runs, *verdicts, plan.control, stopped,
                            files=only is None)
    if main and only is None:
        write_comparison(comparison)
    return comparison


def _run_seed(plan: Plan, index: int, on_event: Event | None, overrides: dict,
              flat: Recipe | None, alone: bool = False) -> SeedRuns:
    """One seed's arms into ``OUT/seed-S/``, beside that seed's plan (``flat``: the plain
    arm's recipe, with --plain). Each arm is read back when it finished (``result.json``,
    as many rows as the recipe's epochs), resumed when interrupted or extended, or started."""
    folder, seed = plan.folder(index), plan.config.seed + index
    if is_main_process() and not (folder / SEED_PLAN).exists():
        write_plan(folder / SEED_PLAN, plan.doc(seed=seed, index=index))

    def arm(name: str, start) -> RunResult:
        config = replace(plan.config, seed=seed, out=str(folder / name), arm=name)
        tagged = None if on_event is None else (  # which run a reporter's line is about
            lambda event, info: on_event(event, {  # "comparison": what --resume continues
                **info, "arm": name, "seed": seed,
                "comparison": str(folder if alone else plan.config.out)}))
        result = read_arm_result(folder / name)
        if result is not None and len(result.rows) == 1 + plan.recipe.total_epochs:
            if tagged is not None:
                tagged("arm_done", {"run_dir": config.out})
            return result
        result = (resume(folder / name, on_event=tagged, **overrides)
                  if (folder / name / RunDir.STATE).exists() else start(config, tagged))
        if is_main_process():
            write_arm_result(result)
        return result

    gct = arm("gct", lambda c, e: finetune(plan.checkpoint, plan.recipe, c, on_event=e))
    control = arm("control", lambda c, e: finetune_control(
        plan.checkpoint, plan.recipe, c, control=plan.control, on_event=e))
    if flat is None:
        return SeedRuns(seed, gct, control)
    plain = arm("plain", lambda c, e: finetune_control(plan.checkpoint, flat, c, on_event=e))
    return SeedRuns(seed, gct, control, plain)


# --- gct-surgery verdict OUT: the seeds present, wherever they ran ------------------------

def comparison_verdict(out: str | Path, *, resolution: float | None = None) -> Comparison:
    """The verdict over the seeds of ``out`` whose arms have all finished, and the seeds
    missing (asked but not finished). Reads only; every seed must share one design."""
    out = Path(out)
    found = sorted(((p, *Plan.read(p)) for p in out.glob(f"seed-*/{SEED_PLAN}")),
                   key=lambda found: found[2]["seed"])  # (path, plan, its record)
    if not found:
        raise UserError(f"{out} holds no seed of a comparison (seed-*/{SEED_PLAN}); run "
                        f"gct-surgery finetune ... --baseline --out {out} first")
    _same_design(found)
    first = found[0][1]  # every seed's plan records the whole design (--seeds included)
    plan = replace(first, resolution=resolution or first.resolution)
    finished = [r for r in (_finished(path.parent, d["seed"], p.plain) for path, p, d in found)
                if r]
    asked = plan.seeds if isinstance(plan.seeds, int) else max(
        [p.seeds for _, p, _ in found if isinstance(p.seeds, int)] or [0])
    wanted = {plan.config.seed + i for i in range(asked)} | {d["seed"] for *_, d in found}
    missing = sorted(wanted - {r.seed for r in finished})
    if not finished:
        raise UserError(f"no seed of {out} has finished yet (missing: "
                        f"{', '.join(map(str, missing))})")
    if _per_image(finished[0].gct).ndim > 1:  # a task's reduce: code the plans name
        require(plan.config.task, named_by=str(found[0][0]), what="a task")
    return Comparison(out, finished, paired_verdict(plan, finished),
                      paired_verdict(plan, finished, "plain"), plan.control, missing=missing,
                      files=False)


def _finished(folder: Path, seed: int, plain: bool) -> SeedRuns | None:
    arms = {a: read_arm_result(folder / a) for a in ("gct", "control", "plain")[:2 + plain]}
    done = all(r is not None and read_per_image(r.run_dir) is not None for r in arms.values())
    return SeedRuns(seed, **arms) if done else None


def _same_design(found: list[tuple[Path, Plan, dict]]) -> None:
    """Seeds of one verdict share the recipe, control and every setting that changes a
    result; only the seed and per-machine settings (``PER_MACHINE``) may differ."""
    first, *others = ({"recipe": p.recipe.to_dict(), "control": p.control, "plain": p.plain,
                       **{f"config {k}": v for k, v in asdict(p.config).items()
                          if k not in PER_MACHINE}} for _, p, _ in found)
    for (path, *_), other in zip(found[1:], others):
        key = next((k for k in first if other.get(k) != first[k]), None)
        if key is not None:
            raise UserError(f"{path} was run with another {key} ({other.get(key)!r:.60}) than "
                            f"{found[0][0]} ({first[key]!r:.60}): a verdict pairs seeds of one "
                            "design; move that seed to another folder")
