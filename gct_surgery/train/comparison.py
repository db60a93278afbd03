"""A comparison's design (``Plan``), its results (``SeedRuns``, ``Comparison``) and its
verdict from the per-image results the arms left in their folders: what ``compare.py``
writes at the end of a run and what ``gct-surgery verdict OUT`` reads from the seeds
present, wherever they ran (``--seed-index`` jobs on many machines)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..io.trust import require
from .config import RunResult, TrainConfig
from .faults import RunError
from .outputs import COMPARISON_PLAN, SEED_PLAN, read_arm_result, read_per_image, read_plan
from .recipe import Recipe
from .stages import Stage
from .task import load_task
from .verdict import Verdict, default_resolution, verdict

CONTROLS = ("static", "identity")
# What may differ between the seeds of one design (the machine, where the data lies).
PER_MACHINE = ("seed", "out", "data", "workers", "threads", "device", "class_map",
               "metrics_format", "save_every", "strict", "skip_nonfinite", "fast_frozen")


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
        if self.seeds != "auto" and self.seeds is not None and (
                not isinstance(self.seeds, int) or self.seeds < 1):
            raise UserError(f"--seeds {self.seeds}: give a whole number of 1 or more, or auto")
        if self.seeds == "auto" and self.max_seeds < 2:
            raise UserError(f"--max-seeds {self.max_seeds}: --seeds auto needs 2 or more")
        if self.control not in CONTROLS:
            raise UserError(f"--control {self.control}: choose one of {', '.join(CONTROLS)}")
        if self.resolution is not None and not self.resolution > 0:
            raise UserError(f"--resolution {self.resolution}: give a difference above 0")

    def doc(self, **more) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, **more}

    @property
    def count(self) -> int:
        return self.max_seeds if self.seeds == "auto" else (self.seeds or 1)


def plain_recipe(recipe: Recipe, new_head: bool = False) -> Recipe:
    """One full stage for the recipe's total epochs with its (last) full stage's settings
    and BatchNorm handling; a head the recipe trains in a gates or head stage (a
    ``new_head`` in every gates stage) keeps that stage's learning rate."""
    fulls = [s for s in recipe.stages if s.kind == "full"]
    full = fulls[-1] if fulls else Stage("plain", "full")
    epochs = sum(s.epochs for s in recipe.stages)
    head = next((s for s in recipe.stages if s.kind == "head"
                 or (s.kind == "gates" and (s.train_head or new_head))), None)
    stage = replace(full, name="plain", kind="full", epochs=epochs, train_head=False,
                    train_bn=False, freeze_bn=full.bn_frozen, base_lr=full.effective_base_lr,
                    head_lr=head.lr if head is not None else None)
    return Recipe((stage,), f"{recipe.source} ({plain_label(stage)})")


def plain_label(stage: Stage) -> str:
    """What the plain reference is, in words: its length, BatchNorm handling, head lr."""
    head = stage.head_lr if stage.head_lr is not None else stage.effective_base_lr
    return (f"plain: one full stage of {stage.epochs} epoch{'s' if stage.epochs != 1 else ''}, "
            f"BN statistics {'frozen' if stage.bn_frozen else 'updating'}, the head at lr {head:g}")


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
    verdict: Verdict | None          # None on a torchrun rank other than 0
    plain_verdict: Verdict | None
    metric: str
    control: str = "static"
    stopped: str = ""                # why --seeds auto stopped
    missing: list[int] | None = None  # gct-surgery verdict: seeds not (yet) finished
    files: bool = True               # comparison.json and metrics.png written (not a seed job)

    def to_dict(self) -> dict:
        d = {"out": str(self.out), "compared": "final epoch, image by image", "metric": self.metric,
             "control": self.control, "verdict": self.verdict.to_dict() if self.verdict else None,
             "runs": [r.to_dict() for r in self.runs]}
        if self.stopped:
            d["stopped"] = self.stopped
        if self.missing is not None:
            d["missing_seeds"] = self.missing
        if self.plain_verdict is not None:
            d["plain_verdict"] = self.plain_verdict.to_dict()
        return d


def paired_verdict(plan: Plan, runs: list[SeedRuns], other: str = "control", looks: int = 1,
             max_looks: int | None = None) -> Verdict | None:
    """GCT minus ``other`` image by image over the seeds (None: no ``other`` arm)."""
    if getattr(runs[0], other) is None:
        return None
    first = runs[0].gct
    arrays = [[_per_image(getattr(r, arm)) for r in runs] for arm in ("gct", other)]
    metric = first.primary_metric
    try:
        v = verdict(*arrays, metric=metric, higher_is_better=first.higher_is_better,
                    resolution=plan.resolution or default_resolution(metric),
                    reduce=task_reduce(plan) if arrays[0][0].ndim > 1 else None,
                    looks=looks, max_looks=max_looks)
    except ValueError as e:
        raise RunError(f"{plan.config.out}: the arms' per-image results cannot be paired ({e}); "
                       "every seed must score the same validation images") from None
    if other == "plain":
        trained = runs[0].plain.stages[0].get("trained", "every parameter")
        bn = "frozen" if plain_recipe(plan.recipe).stages[0].bn_frozen else "updating"
        label = f"the plain fine-tune ({trained}; BN statistics {bn})"
        v = replace(v, text=f"against {label}: "
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


# --- gct-surgery verdict OUT: the seeds present, wherever they ran ------------------------

def comparison_verdict(out: str | Path, *, resolution: float | None = None) -> Comparison:
    """The verdict over the seeds of ``out`` whose arms have all finished, and the seeds
    missing (asked but not finished). Reads only; every seed must share one design."""
    out = Path(out)
    paths = sorted(out.glob(f"seed-*/{SEED_PLAN}"),
                   key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    if not paths:
        raise UserError(f"{out} holds no seed of a comparison (seed-*/{SEED_PLAN}); run "
                        f"gct-surgery finetune ... --baseline --out {out} first")
    docs = [read_plan(p) for p in paths]
    _same_design(paths, docs)
    whole = read_plan(out / COMPARISON_PLAN) if (out / COMPARISON_PLAN).is_file() else None
    plan = Plan(**{k: v for k, v in (whole or docs[0]).items() if k in Plan.__dataclass_fields__})
    plan = replace(plan, resolution=resolution or plan.resolution)
    finished = [r for r in (_finished(p.parent, d) for p, d in zip(paths, docs)) if r]
    done = {r.seed for r in finished}
    asked = plan.seeds if isinstance(plan.seeds, int) else max(
        [d["seeds"] for d in docs if isinstance(d["seeds"], int)] or [0])
    base = plan.config.seed
    missing = sorted(({base + i for i in range(asked)} | {d["seed"] for d in docs}) - done)
    if not finished:
        raise UserError(f"no seed of {out} has finished yet (missing: "
                        f"{', '.join(map(str, missing))})")
    auto = plan.seeds == "auto" and len(finished) >= 2
    looks = (len(finished) - 1, plan.max_seeds - 1) if auto else (1, None)
    if _reduces(finished):
        require(plan.config.task, named_by=str(paths[0]), what="a task")
    return Comparison(out, finished, paired_verdict(plan, finished, "control", *looks),
                      paired_verdict(plan, finished, "plain"), finished[0].gct.primary_metric,
                      plan.control, missing=missing, files=False)


def _finished(folder: Path, doc: dict) -> SeedRuns | None:
    arms = {a: read_arm_result(folder / a) for a in ("gct", "control", "plain")}
    wanted = ("gct", "control", "plain") if doc["plain"] else ("gct", "control")
    if any(arms[a] is None or read_per_image(folder / a) is None for a in wanted):
        return None
    plain = arms["plain"] if doc["plain"] else None
    return SeedRuns(doc["seed"], arms["gct"], arms["control"], plain)


def _reduces(runs: list[SeedRuns]) -> bool:
    return _per_image(runs[0].gct).ndim > 1


def _same_design(paths: list[Path], docs: list[dict]) -> None:
    """Seeds of one verdict share the recipe, control and every setting that changes a
    result; only the seed and per-machine settings (``PER_MACHINE``) may differ."""
    def design(d: dict) -> dict:
        config = {k: v for k, v in asdict(d["config"]).items() if k not in PER_MACHINE}
        return {"recipe": d["recipe"].to_dict(), "control": d["control"], "plain": d["plain"],
                **{f"config {k}": v for k, v in config.items()}}

    first = design(docs[0])
    for path, doc in zip(paths[1:], docs[1:]):
        other = design(doc)
        for key in first:
            if other.get(key) != first[key]:
                raise UserError(f"{path} was run with another {key} ({other.get(key)!r:.60}) than "
                                f"{paths[0]} ({first[key]!r:.60}): a verdict pairs seeds of one "
                                "design; move that seed to another folder")
