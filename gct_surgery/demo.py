"""The end-to-end demo: the whole pipeline on the bundled Fashion-MNIST subset.

Every step calls the same library function as the command it stands for, in order:

1. write the bundled data as an image folder;
2. briefly train a small timm CNN as "the user's existing model" and save its state
   dict as an ordinary ``.pth`` checkpoint (``finetune`` with one full stage on an
   un-gated model);
3. ``inject`` -> ``finetune --stage gates`` -> ``finetune --stage full`` -> ``export``
   -> ``eval``;
4. the honest comparison (``finetune --baseline``): the same recipe run once with the
   gates and once as its control, the gates held at identity, and the verdict.

``DemoResult.commands`` holds the equivalent command lines, so a user can repeat each
step by hand.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError

Event = Callable[[str, dict], None]
CONTROL_STEP = "control (same recipe, gates at identity)"


@dataclass
class DemoSettings:
    """Sized to finish in a few minutes on 2 CPU cores."""

    out: str = "demo-out"
    model: str = "timm:resnet10t"
    img_size: int = 32
    pretrain_epochs: int = 5
    gates_epochs: int = 2
    full_epochs: int = 3
    batch_size: int = 64
    workers: int | None = None  # None: auto, as finetune and eval choose (train/machine.py)
    threads: int | None = None
    seed: int = 0
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
    out: Path
    steps: list[DemoStep]
    params_base: int = 0
    params_added: int = 0
    gates: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verdict: dict = field(default_factory=dict)  # train.verdict.Verdict.to_dict()

    @property
    def commands(self) -> list[str]:
        return [s.command for s in self.steps if s.command]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "seconds": round(self.seconds, 1),
                "params_base": self.params_base, "params_added": self.params_added,
                "gates": self.gates, "files": self.files, "verdict": self.verdict,
                "steps": [s.__dict__ for s in self.steps]}


def run_demo(settings: DemoSettings = DemoSettings(), *, on_event: Event | None = None) -> DemoResult:
    """Run the whole pipeline into ``settings.out`` and return what each step gave."""
    from .bundled_data import write_image_folder
    from .io.checkpoint import load_checkpoint
    from .io.export import export
    from .operations import inject_model, open_model
    from .train.compare import compare
    from .train.config import TrainConfig
    from .train.evaluate import evaluate_checkpoint
    from .train.loop import finetune
    from .train.recipe import Recipe, default_recipe, load_recipe
    from .train.stages import Stage

    started = time.perf_counter()
    s = settings
    out = _prepare(Path(s.out), s.force)
    emit = on_event or (lambda kind, info: None)
    steps: list[DemoStep] = []
    speed = "".join(f" --{k} {v}" for k, v in (("workers", s.workers), ("threads", s.threads))
                    if v is not None)
    common = f"--img-size {s.img_size} --batch-size {s.batch_size}{speed} --seed {s.seed}"

    def config(run: str) -> TrainConfig:
        return TrainConfig(data=str(data), out=str(out / run), batch_size=s.batch_size,
                           workers=s.workers, threads=s.threads, seed=s.seed, img_size=s.img_size)

    def step(name: str, command: str, fn):
        emit("step_start", {"name": name, "command": command})
        t0 = time.perf_counter()
        value = fn()
        st = DemoStep(name, command, time.perf_counter() - t0)
        steps.append(st)
        return st, value

    def scored(st: DemoStep, checkpoint: Path) -> None:
        r = evaluate_checkpoint(checkpoint, data, batch_size=256, workers=s.workers,
                                threads=s.threads)
        st.top1, st.top5, st.output = r.top1, r.top5, str(checkpoint)
        emit("step_end", {"name": st.name, "seconds": st.seconds, "top1": st.top1})

    # 1. Data.
    data = out / "data"
    st, _ = step("data", "", lambda: write_image_folder(data))
    emit("step_end", {"name": st.name, "seconds": st.seconds})

    # 2. The user's existing model: trained briefly, saved as a plain state dict.
    pretrain = Recipe((Stage(name="pretrain", kind="full", epochs=s.pretrain_epochs, lr=3e-3,
                             base_lr=3e-3, warmup=0.05),), "demo pre-training")
    base_pth = out / "base.pth"

    def train_base():
        model, meta = open_model(s.model, num_classes=10)
        from .io.checkpoint import save

        save(model, out / "untrained.safetensors", meta)
        result = finetune(out / "untrained.safetensors", pretrain, config("runs/pretrain"),
                          on_event=emit)
        trained = load_checkpoint(result.run_dir / "last.safetensors").model
        import torch

        from .io.atomic import atomic_path

        with atomic_path(base_pth) as tmp:
            torch.save(trained.state_dict(), tmp)
        return result

    st, _ = step("existing model (trained briefly)", "", train_base)
    scored(st, out / "runs/pretrain/last.safetensors")
    st.output = str(base_pth)

    # 3. The pipeline, through the commands' library calls.
    gated = out / "gated.safetensors"
    st, injected = step(
        "inject", f"gct-surgery inject {base_pth} --arch {s.model} --num-classes 10 "
        f"--input-size 3,{s.img_size},{s.img_size} -o {gated}",
        lambda: inject_model(*open_model(str(base_pth), arch=s.model, num_classes=10),
                             output=gated, input_size=[3, s.img_size, s.img_size]))
    scored(st, gated)
    if injected.max_abs_diff != 0.0:
        raise UserError(f"injection changed the output by {injected.max_abs_diff}")

    recipe = default_recipe()
    gates_recipe = recipe.only("gates").override(epochs=s.gates_epochs)
    full_recipe = recipe.only("full").override(epochs=s.full_epochs)
    st, _ = step("finetune --stage gates",
                 f"gct-surgery finetune {gated} --data {data} --stage gates --epochs {s.gates_epochs} "
                 f"{common} --out {out}/runs/gates",
                 lambda: finetune(gated, gates_recipe, config("runs/gates"), on_event=emit))
    scored(st, out / "runs/gates/last.safetensors")
    st, _ = step("finetune --stage full",
                 f"gct-surgery finetune {out}/runs/gates/last.safetensors --data {data} --stage full "
                 f"--epochs {s.full_epochs} {common} --out {out}/runs/full",
                 lambda: finetune(out / "runs/gates/last.safetensors", full_recipe,
                                  config("runs/full"), on_event=emit))
    scored(st, out / "runs/full/last.safetensors")

    model_out = out / "model.safetensors"
    st, exported = step("export", f"gct-surgery export {out}/runs/full/last.safetensors -o {model_out}",
                        lambda: export(out / "runs/full/last.safetensors", model_out,
                                       input_size=[3, s.img_size, s.img_size]))
    st.output = str(model_out)
    emit("step_end", {"name": st.name, "seconds": st.seconds, "max_abs_diff": exported.max_abs_diff})
    st, evaluated = step("eval", f"gct-surgery eval {model_out} --data {data}",
                         lambda: evaluate_checkpoint(model_out, data, batch_size=256,
                                                     workers=s.workers, threads=s.threads))
    st.top1, st.top5, st.output = evaluated.top1, evaluated.top5, str(model_out)
    emit("step_end", {"name": st.name, "seconds": st.seconds, "top1": st.top1})

    # 4. The honest comparison: the two stages above as one recipe, run with the gates
    # and as the control (gates held at identity), same seed, data order and head.
    recipe_file = out / "recipe.yaml"
    _write_recipe(recipe_file, Recipe((*gates_recipe.stages, *full_recipe.stages), "demo"))
    st, compared = step(CONTROL_STEP,
                        f"gct-surgery finetune {gated} --data {data} --recipe {recipe_file} --baseline "
                        f"{common} --out {out}/runs/compare",
                        lambda: compare(gated, load_recipe(recipe_file), config("runs/compare"),
                                        on_event=emit))
    control = compared.runs[0].control
    st.top1, st.top5 = control.last["top1"], control.last["top5"]
    st.output = str(control.run_dir / "last.safetensors")
    emit("step_end", {"name": st.name, "seconds": st.seconds, "top1": st.top1})

    report = injected.report
    files = sorted(str(p) for p in [base_pth, gated, model_out, recipe_file,
                                    *(out / "runs").glob("*/metrics.*"), *(out / "runs").glob("*/comparison.json"),
                                    *(out / "runs").glob("*/last.safetensors")])
    return DemoResult(out, steps, report.base_params, report.params_added, report.gates_total,
                      files, time.perf_counter() - started, compared.verdict.to_dict())


def _write_recipe(path: Path, recipe) -> None:
    """A recipe as YAML that ``--recipe`` reads back."""
    import yaml

    from .io.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump({"stages": recipe.to_dict()["stages"]}, sort_keys=False))


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
