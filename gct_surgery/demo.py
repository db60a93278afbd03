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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import DataError, UserError

Event = Callable[[str, dict], None]


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
    workers: int | None = None  # None: auto, as finetune and eval choose (train/distributed.py)
    threads: int | None = None
    force: bool = False


@dataclass
class DemoStep:
    name: str
    command: str
    seconds: float = 0.0
    top1: float | None = None
    top5: float | None = None
    output: str | None = None


@dataclass
class DemoResult:
    """Each step, the inject step's report (``base_params``, ``params_added``,
    ``gates_total``) and the comparison (``train.compare.Comparison``) with its verdict."""

    out: Path
    steps: list[DemoStep]
    comparison: Any
    injected: Any
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def commands(self) -> list[str]:
        return [s.command for s in self.steps if s.command] + [
            f"gct-surgery verdict {self.comparison.out}"]

    def to_dict(self) -> dict:
        from .train.verdict import json_safe

        c = self.comparison
        seeds = [{"seed": r.seed, "seconds": r.gct.seconds + r.control.seconds,
                  "gct": r.gct.last["top1"], "control": r.control.last["top1"],
                  "difference": r.gct.last["top1"] - r.control.last["top1"]} for r in c.runs]
        return json_safe({
            "out": str(self.out), "seconds": round(self.seconds, 1),
            "params_base": self.injected.base_params, "params_added": self.injected.params_added,
            "gates": self.injected.gates_total, "files": self.files,
            "verdict": c.verdict.to_dict() if c.verdict else {}, "seeds": seeds,
            "stages": c.runs[0].gct.stages, "steps": [s.__dict__ for s in self.steps],
            "commands": self.commands})


def run_demo(s: DemoSettings = DemoSettings(), *, on_event: Event | None = None) -> DemoResult:
    """Run the whole pipeline into ``s.out`` (the settings) and return what each step gave."""
    started = time.perf_counter()
    out = _prepare(Path(s.out), s.force)  # before torch is imported: a refusal is instant

    import torch
    import yaml

    from .bundled_data import write_image_folder
    from .io.atomic import atomic_path, atomic_write_text
    from .io.checkpoint import load_checkpoint, save
    from .io.export import export
    from .operations import inject_model, open_model
    from .train.compare import compare
    from .train.config import TrainConfig
    from .train.evaluate import evaluate_checkpoint
    from .train.loop import finetune
    from .train.outputs import RunDir
    from .train.recipe import Recipe, default_recipe, load_recipe
    from .train.stages import Stage

    emit = on_event or (lambda kind, info: None)
    steps: list[DemoStep] = []
    speed = "".join(f" --{k} {v}" for k, v in (("workers", s.workers), ("threads", s.threads))
                    if v is not None)
    common = f"--img-size {s.img_size} --batch-size {s.batch_size}{speed} --seed 0"
    size = [3, s.img_size, s.img_size]

    def step(name: str, command: str, fn, scored: Path | None = None, output=None, shown=True):
        """Run ``fn`` as one step; ``scored``: evaluate that checkpoint as the step's top-1;
        ``shown``: a row of the demo's table (the comparison's rows are its arms)."""
        emit("step_start", {"name": name, "command": command})
        t0 = time.perf_counter()
        value = fn()
        r = (None if scored is None else
             evaluate_checkpoint(scored, data, batch_size=256, workers=s.workers,
                                 threads=s.threads))
        st = DemoStep(name, command, time.perf_counter() - t0, getattr(r, "top1", None),
                      getattr(r, "top5", None), str(output or scored))
        if shown:
            steps.append(st)
        emit("step_end", {"name": name, "seconds": st.seconds, "top1": st.top1})
        return value

    def train_base():
        """A timm model trained from scratch for a few epochs, saved as a plain state dict."""
        pretrain = Recipe((Stage(name="pretrain", kind="full", epochs=s.pretrain_epochs,
                                 lr=s.pretrain_lr, base_lr=s.pretrain_lr, warmup=0.05),),
                          "demo pre-training")
        model, meta = open_model(s.model, num_classes=10)
        save(model, untrained, meta)
        result = finetune(untrained, pretrain, replace(config, out=str(out / "runs/pretrain")),
                          on_event=emit)
        with atomic_path(base_pth) as tmp:
            torch.save(load_checkpoint(result.run_dir / RunDir.LAST).model.state_dict(), tmp)

    # 1. Data (an earlier demo's data of another subset is replaced: _prepare made sure the
    # folder is the demo's own). 2. The user's existing model, saved as a plain state dict.
    data, base_pth, untrained = out / "data", out / "base.pth", out / "untrained.safetensors"
    config = TrainConfig(data=str(data), out=str(out), batch_size=s.batch_size,
                         workers=s.workers, threads=s.threads, img_size=s.img_size)
    try:
        step("data", "", lambda: write_image_folder(data, per_class=s.per_class), output=data)
    except DataError:
        shutil.rmtree(data, ignore_errors=True)
        step("data", "", lambda: write_image_folder(data, per_class=s.per_class), output=data)
    step("existing model (trained briefly)", "", train_base,
         scored=out / "runs/pretrain" / RunDir.LAST, output=base_pth)

    # 3. Inject: the gated model scores exactly what the base scored (its eval shows it).
    gated = out / "gated.safetensors"
    injected = step(
        "inject", f"gct-surgery inject {base_pth} --arch {s.model} --num-classes 10 "
        f"--input-size {','.join(map(str, size))} -o {gated}",
        lambda: inject_model(*open_model(str(base_pth), arch=s.model, num_classes=10),
                             output=gated, input_size=size), scored=gated)

    # 4. Fine-tune (gates, then full) and its control, seed after seed, then the verdict.
    # Seed 0's GCT arm is the fine-tune the rest of the pipeline exports.
    recipe = default_recipe()
    recipe = Recipe((*recipe.only("gates").override(epochs=s.gates_epochs).stages,
                     *recipe.only("full").override(epochs=s.full_epochs).stages), "demo")
    recipe_file = out / "recipe.yaml"
    atomic_write_text(recipe_file, yaml.safe_dump({"stages": recipe.to_dict()["stages"]},
                                                  sort_keys=False))  # what --recipe reads
    compare_dir = out / "runs/compare"
    baseline = (f"gct-surgery finetune {gated} --data {data} --recipe {recipe_file} --baseline "
                f"--seeds {s.seeds} {common} --out {compare_dir}")
    compared = step(f"finetune --baseline --seeds {s.seeds}", baseline,
                    lambda: compare(gated, load_recipe(recipe_file),
                                    replace(config, out=str(compare_dir)), seeds=s.seeds,
                                    on_event=emit), output=compare_dir, shown=False)
    first, rest = compared.runs[0], compared.runs[1:]
    alone = (f"gct-surgery finetune {gated} --data {data} --recipe {recipe_file} {common} "
             f"--out {out}/runs/finetune")  # seed 0's GCT arm as the user repeats it
    for name, run, command in (
            (f"finetune: gates, then full (GCT, seed {first.seed})", first.gct, alone),
            (f"control: the same recipe, gamma held at 0 (seed {first.seed})", first.control,
             baseline)):
        steps.append(DemoStep(name, command, run.seconds, run.last["top1"],
                              run.last.get("top5"), str(run.run_dir / RunDir.LAST)))
    if rest:
        steps.append(DemoStep(f"seeds {', '.join(str(r.seed) for r in rest)}: GCT and control",
                              "", sum(r.gct.seconds + r.control.seconds for r in rest),
                              output=str(compare_dir)))

    # 5. Export seed 0's GCT arm and evaluate the exported file.
    model_out = out / "model.safetensors"
    last = first.gct.run_dir / RunDir.LAST
    step("export", f"gct-surgery export {last} -o {model_out}",
         lambda: export(last, model_out, input_size=size), output=model_out)
    step("eval", f"gct-surgery eval {model_out} --data {data}", lambda: None, scored=model_out)

    files = [base_pth, gated, recipe_file, model_out, compare_dir / RunDir.COMPARISON,
             compare_dir / RunDir.PLOT, last, first.control.run_dir / RunDir.LAST]
    return DemoResult(out, steps, compared, injected.report,
                      [str(f) for f in files if f.exists()], time.perf_counter() - started)


def _prepare(out: Path, force: bool) -> Path:
    """The demo writes into a fresh folder; ``force`` replaces an earlier demo's output."""
    marker = out / ".gct-surgery-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise UserError(f"{out} exists and is not a demo folder; choose another --out")
        if not force:
            raise UserError(f"{out} already holds a demo; pass --force to replace it")
        for child in (c for c in out.iterdir() if c.name != "data"):  # the data is reused
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return out
