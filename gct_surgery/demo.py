"""The end-to-end demo: the whole pipeline on the bundled Fashion-MNIST subset, and a
verdict over several seeds.

Every step calls the same library function as the command it stands for, in order:

1. write the bundled data as an image folder;
2. briefly train a small timm CNN as "the user's existing model" and save its state
   dict as an ordinary ``.pth`` checkpoint (``finetune`` with one full stage on an
   un-gated model);
3. ``inject``;
4. ``finetune --baseline --seeds N``: the recipe (gates, then full) run with the gates
   and as their control (the same surgery with gamma held at 0: static per-channel
   scales) for N paired seeds, and the verdict. Seed 0's GCT arm *is* the pipeline's
   fine-tune (``finetune --recipe`` with ``--seed 0`` repeats it alone), so it is not run
   a second time;
5. ``export`` that fine-tuned model -> ``eval`` the exported file.

``DemoResult.commands`` holds the equivalent command lines, so a user can repeat each
step by hand. Sized for 2 CPU cores (docs/performance.md, "The demo").
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import DataError, UserError

Event = Callable[[str, dict], None]
GCT_STEP = "finetune: gates, then full (GCT, seed {seed})"
CONTROL_STEP = "control: the same recipe, gamma held at 0 (seed {seed})"
SEEDS_STEP = "seeds {seeds}: GCT and control"


@dataclass
class DemoSettings:
    """Sized to finish within 3 minutes on a quiet 2-core CPU (docs/performance.md)."""

    out: str = "demo-out"
    model: str = "timm:resnet10t"
    img_size: int = 32
    pretrain_epochs: int = 3
    gates_epochs: int = 1
    full_epochs: int = 1
    seeds: int = 3                  # paired seeds of the comparison (at least 2 for a verdict)
    batch_size: int = 128           # 64 costs ~20% more time for ~2 points of pre-training
    pretrain_lr: float = 6e-3       # the existing model's training (from scratch)
    per_class: tuple[int, int] | None = None  # (train, val) images a class; None: all
    workers: int | None = None  # None: auto, as finetune and eval choose (train/machine.py)
    threads: int | None = None
    seed: int = 0
    force: bool = False

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise UserError(f"--seeds {self.seeds}: give 1 or more (3 or more for a verdict "
                            "that can say more than 'undetermined')")
        for name in ("pretrain_epochs", "gates_epochs", "full_epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass
class DemoStep:
    name: str
    command: str
    seconds: float = 0.0
    top1: float | None = None
    top5: float | None = None
    output: str | None = None


@dataclass
class DemoSeed:
    """One paired seed of the comparison: the final-epoch top-1 of each arm."""

    seed: int
    gct: float | None
    control: float | None
    seconds: float

    @property
    def difference(self) -> float | None:
        return None if self.gct is None or self.control is None else self.gct - self.control


@dataclass
class DemoResult:
    out: Path
    steps: list[DemoStep]
    params_base: int = 0
    params_added: int = 0
    gates: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verdict: dict = field(default_factory=dict)  # train.verdict.Verdict.to_dict()
    seeds: list[DemoSeed] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # seed 0's GCT arm, per stage
    commands_extra: list[str] = field(default_factory=list)  # commands that are not one step

    @property
    def commands(self) -> list[str]:
        return [s.command for s in self.steps if s.command] + self.commands_extra

    def to_dict(self) -> dict:
        from .train.verdict import json_safe

        return json_safe({
            "out": str(self.out), "seconds": round(self.seconds, 1),
            "params_base": self.params_base, "params_added": self.params_added,
            "gates": self.gates, "files": self.files, "verdict": self.verdict,
            "seeds": [{**s.__dict__, "difference": s.difference} for s in self.seeds],
            "stages": self.stages, "steps": [s.__dict__ for s in self.steps],
            "commands": self.commands})


def run_demo(settings: DemoSettings = DemoSettings(), *,
             on_event: Event | None = None) -> DemoResult:
    """Run the whole pipeline into ``settings.out`` and return what each step gave."""
    started = time.perf_counter()
    s = settings
    out = _prepare(Path(s.out), s.force)  # before torch is imported: a refusal is instant

    from .io.export import export
    from .operations import inject_model, open_model
    from .train.compare import compare
    from .train.evaluate import evaluate_checkpoint
    from .train.recipe import Recipe, default_recipe, load_recipe

    emit = on_event or (lambda kind, info: None)
    steps: list[DemoStep] = []
    speed = "".join(f" --{k} {v}" for k, v in (("workers", s.workers), ("threads", s.threads))
                    if v is not None)
    common = f"--img-size {s.img_size} --batch-size {s.batch_size}{speed} --seed {s.seed}"

    def step(name: str, command: str, fn):
        emit("step_start", {"name": name, "command": command})
        t0 = time.perf_counter()
        value = fn()
        st = DemoStep(name, command, time.perf_counter() - t0)
        steps.append(st)
        return st, value

    def done(st: DemoStep, **extra) -> None:
        emit("step_end", {"name": st.name, "seconds": st.seconds, "top1": st.top1, **extra})

    def scored(st: DemoStep, checkpoint: Path) -> None:
        r = evaluate_checkpoint(checkpoint, data, batch_size=256, workers=s.workers,
                                threads=s.threads)
        st.top1, st.top5, st.output = r.top1, r.top5, str(checkpoint)
        done(st)

    # 1. Data.
    data = out / "data"
    st, _ = step("data", "", lambda: _write_data(data, s.per_class))
    st.output = str(data)
    done(st)

    # 2. The user's existing model: trained briefly, saved as a plain state dict.
    base_pth = out / "base.pth"
    st, _ = step("existing model (trained briefly)", "",
                 lambda: _train_base(s, data, out, base_pth, emit))
    scored(st, out / "runs/pretrain/last.safetensors")
    st.output = str(base_pth)

    # 3. Inject: the gated model must score exactly what the base scored.
    gated = out / "gated.safetensors"
    st, injected = step(
        "inject", f"gct-surgery inject {base_pth} --arch {s.model} --num-classes 10 "
        f"--input-size 3,{s.img_size},{s.img_size} -o {gated}",
        lambda: inject_model(*open_model(str(base_pth), arch=s.model, num_classes=10),
                             output=gated, input_size=[3, s.img_size, s.img_size]))
    scored(st, gated)
    if injected.max_abs_diff != 0.0:
        raise UserError(f"injection changed the output by {injected.max_abs_diff}")

    # 4. Fine-tune (gates, then full) and its control, seed after seed, then the verdict.
    # Seed 0's GCT arm is the fine-tune the rest of the pipeline exports.
    recipe = default_recipe()
    recipe = Recipe((*recipe.only("gates").override(epochs=s.gates_epochs).stages,
                     *recipe.only("full").override(epochs=s.full_epochs).stages), "demo")
    recipe_file = out / "recipe.yaml"
    _write_recipe(recipe_file, recipe)
    compare_dir = out / "runs/compare"
    baseline = (f"gct-surgery finetune {gated} --data {data} --recipe {recipe_file} --baseline "
                f"--seeds {s.seeds} {common} --out {compare_dir}")
    emit("step_start", {"name": f"finetune --baseline --seeds {s.seeds}", "command": baseline})
    t0 = time.perf_counter()
    compared = compare(gated, load_recipe(recipe_file), _config(s, data, compare_dir),
                       seeds=s.seeds, on_event=emit)
    first = compared.runs[0]
    gct_dir = first.gct.run_dir
    steps.append(_arm_step(GCT_STEP.format(seed=first.seed), first.gct,
                           f"gct-surgery finetune {gated} --data {data} --recipe {recipe_file} "
                           f"{common} --out {out}/runs/finetune"))
    steps.append(_arm_step(CONTROL_STEP.format(seed=first.seed), first.control, baseline))
    if len(compared.runs) > 1:
        rest = compared.runs[1:]
        label = ", ".join(str(r.seed) for r in rest)
        steps.append(DemoStep(SEEDS_STEP.format(seeds=label), "",
                              sum(r.gct.seconds + r.control.seconds for r in rest),
                              output=str(compare_dir)))
    emit("step_end", {"name": "comparison", "seconds": time.perf_counter() - t0, "top1": None})

    # 5. Export seed 0's GCT arm and evaluate the exported file.
    model_out = out / "model.safetensors"
    last = gct_dir / "last.safetensors"
    st, exported = step("export", f"gct-surgery export {last} -o {model_out}",
                        lambda: export(last, model_out, input_size=[3, s.img_size, s.img_size]))
    st.output = str(model_out)
    done(st, max_abs_diff=exported.max_abs_diff)
    st, evaluated = step("eval", f"gct-surgery eval {model_out} --data {data}",
                         lambda: evaluate_checkpoint(model_out, data, batch_size=256,
                                                     workers=s.workers, threads=s.threads))
    st.top1, st.top5, st.output = evaluated.top1, evaluated.top5, str(model_out)
    done(st)

    report = injected.report
    seeds = [DemoSeed(r.seed, (r.gct.last or {}).get("top1"), (r.control.last or {}).get("top1"),
                      r.gct.seconds + r.control.seconds) for r in compared.runs]
    files = [base_pth, gated, recipe_file, model_out, compare_dir / "comparison.json",
             compare_dir / "metrics.png", last, first.control.run_dir / "last.safetensors"]
    return DemoResult(out, steps, report.base_params, report.params_added, report.gates_total,
                      [str(f) for f in files if f.exists()], time.perf_counter() - started,
                      compared.verdict.to_dict() if compared.verdict else {}, seeds,
                      list(first.gct.stages), [f"gct-surgery verdict {compare_dir}"])


def _config(s: DemoSettings, data: Path, out: Path):
    from .train.config import TrainConfig

    return TrainConfig(data=str(data), out=str(out), batch_size=s.batch_size, workers=s.workers,
                       threads=s.threads, seed=s.seed, img_size=s.img_size)


def _arm_step(name: str, run, command: str) -> DemoStep:
    last = run.last or {}
    return DemoStep(name, command, run.seconds, last.get("top1"), last.get("top5"),
                    str(run.run_dir / "last.safetensors"))


def _train_base(s: DemoSettings, data: Path, out: Path, base_pth: Path, emit: Event):
    """A timm model trained from scratch for a few epochs, saved as a plain state dict."""
    import torch

    from .io.atomic import atomic_path
    from .io.checkpoint import load_checkpoint, save
    from .operations import open_model
    from .train.loop import finetune
    from .train.recipe import Recipe
    from .train.stages import Stage

    pretrain = Recipe((Stage(name="pretrain", kind="full", epochs=s.pretrain_epochs,
                             lr=s.pretrain_lr, base_lr=s.pretrain_lr, warmup=0.05),),
                      "demo pre-training")
    model, meta = open_model(s.model, num_classes=10)
    save(model, out / "untrained.safetensors", meta)
    result = finetune(out / "untrained.safetensors", pretrain,
                      _config(s, data, out / "runs/pretrain"), on_event=emit)
    trained = load_checkpoint(result.run_dir / "last.safetensors").model
    with atomic_path(base_pth) as tmp:
        torch.save(trained.state_dict(), tmp)
    return result


def _write_data(data: Path, per_class) -> Path:
    """The bundled images as an image folder; a demo folder's earlier data of another
    subset is replaced (it is the demo's own, and never changes otherwise)."""
    from .bundled_data import write_image_folder

    try:
        return write_image_folder(data, per_class=per_class)
    except DataError:
        if not (data.parent / ".gct-surgery-demo").exists():
            raise
        shutil.rmtree(data, ignore_errors=True)
        return write_image_folder(data, per_class=per_class)


def _write_recipe(path: Path, recipe) -> None:
    """A recipe as YAML that ``--recipe`` reads back."""
    import yaml

    from .io.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump({"stages": recipe.to_dict()["stages"]},
                                           sort_keys=False))


def _prepare(out: Path, force: bool) -> Path:
    """The demo writes into a fresh folder; ``force`` replaces an earlier demo's output."""
    marker = out / ".gct-surgery-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise UserError(f"{out} exists and is not a demo folder; choose another --out")
        if not force:
            raise UserError(f"{out} already holds a demo; pass --force to replace it")
        for child in out.iterdir():
            if child.name != "data":  # the image folder is reused: it never changes
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return out
