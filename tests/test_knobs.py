"""timm's fine-tuning knobs (label smoothing, mixup/cutmix, gradient clipping and
accumulation, channels-last, drop-path, layer-wise lr decay, optimizer, scheduler,
warm-up, weight decay), each shown to act, and all of them together through the CLI.

Tiny real models (timm ``test_resnet``, 3 classes, gates injected) on real PNG files
at 32 px; the shared ``data`` (24 train images) and ``ckpt`` fixtures.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import load_file

from gct_surgery.core.surgery import inject
from gct_surgery.errors import UserError
from gct_surgery.io.checkpoint import load_checkpoint, read_metadata
from gct_surgery.train.config import TrainConfig
from gct_surgery.train.loop import finetune, resume, with_drop_path
from gct_surgery.train.recipe import Recipe, default_recipe
from gct_surgery.train.stages import (Stage, freeze_for_stage, make_optimizer, make_scheduler,
                                      regularizer_for)
from gct_surgery.train.state import read_state
from gct_surgery.train.task import ClassificationTask

FULL = Stage("full", "full", epochs=1, lr=0.05, base_lr=0.05, freeze_bn=True, warmup=0.0,
             opt="momentum", weight_decay=0.0, gate_weight_decay=0.0)


def _config(data, out, **changes) -> TrainConfig:
    settings = dict(batch_size=8, workers=0, seed=1, img_size=32, augment=False)
    return TrainConfig(data=str(data), out=str(out), **{**settings, **changes})


def _run(ckpt, data, out, *stages: Stage, on_event=None, **config):
    return finetune(ckpt, Recipe(tuple(stages)), _config(data, out, **config), on_event=on_event)


def _gated_model():
    model = timm.create_model("test_resnet", num_classes=3)
    inject(model)
    return model


def _losses(events: list) -> list[float]:
    return [info["loss"] for kind, info in events if kind == "step"]


# --- label smoothing, mixup, cutmix ----------------------------------------------------

def test_smoothing_raises_the_loss_of_confident_predictions():
    y = torch.tensor([0, 1, 2, 0])
    confident = torch.nn.functional.one_hot(y, 3).float() * 8.0
    plain = regularizer_for(Stage("s", "full"), ClassificationTask(), _gated_model(), 4)
    smoothed = regularizer_for(Stage("s", "full", smoothing=0.2), ClassificationTask(), _gated_model(), 4)
    x = torch.rand(4, 3, 32, 32)
    same, soft = smoothed(x, y)
    assert same is x and soft.shape == (4, 3)  # no mixing: smoothed one-hot targets
    loss = ClassificationTask().loss  # the task's own loss scores the soft targets
    assert plain(x, y) == (x, y)  # every knob off: the batch as it is
    assert loss(confident, soft) > loss(confident, y) + 0.1
    # the same loss as timm's LabelSmoothingCrossEntropy on the hard labels
    from timm.loss import LabelSmoothingCrossEntropy

    expected = LabelSmoothingCrossEntropy(smoothing=0.2)(confident, y)
    assert loss(confident, soft) == pytest.approx(expected.item(), rel=1e-5)


def test_smoothing_changes_the_training_loss_of_a_run(ckpt, data, tmp_path):
    plain, smooth = [], []
    _run(ckpt, data, tmp_path / "a", FULL, on_event=lambda k, i: plain.append((k, i)))
    _run(ckpt, data, tmp_path / "b", replace(FULL, smoothing=0.3),
         on_event=lambda k, i: smooth.append((k, i)))
    # The same seed, model and first batch: only the loss differs.
    assert _losses(smooth)[0] != pytest.approx(_losses(plain)[0], abs=1e-6)


def test_mixup_and_cutmix_change_the_batch_and_soften_the_targets():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for stage in (Stage("m", "full", mixup=1.0, smoothing=0.1), Stage("c", "full", cutmix=1.0)):
        reg = regularizer_for(stage, ClassificationTask(), _gated_model(), 8)
        mixed, soft = reg(x.clone(), y)
        assert not torch.equal(mixed, x), stage.name  # images blended or pasted
        assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
        assert not torch.equal(soft, torch.nn.functional.one_hot(y, 3).float())
        if stage.smoothing:  # folded into the mixed targets: no class gets zero
            assert soft.min() >= 0.1 / 3 - 1e-6
        assert ClassificationTask().loss(torch.randn(8, 3), soft).ndim == 0  # soft targets


def test_mixup_is_refused_for_a_task_without_soft_targets():
    class Saliency:
        metric_names, primary_metric, higher_is_better = ("mae",), "mae", False

        def loss(self, output, target):
            return (output - target).abs().mean()

    with pytest.raises(UserError, match="soft_targets") as e:
        regularizer_for(Stage("m", "full", mixup=0.2), Saliency(), _gated_model(), 8)
    assert "\n" not in str(e.value)


def test_mixup_needs_an_even_batch():
    with pytest.raises(UserError, match="even"):
        regularizer_for(Stage("m", "full", cutmix=1.0), ClassificationTask(), _gated_model(), 5)


# --- gradient clipping and accumulation ---------------------------------------------

def test_clip_grad_bounds_the_update(ckpt, data, tmp_path):
    """Momentum SGD's first update is lr x gradient, so its norm is at most lr x clip."""
    one_step = replace(FULL, lr=1.0, base_lr=1.0)
    before = load_file(ckpt)

    def update_norm(out) -> float:
        after = load_file(out / "last.safetensors")
        return torch.stack([(after[k].float() - before[k].float()).norm() for k in before
                            if before[k].is_floating_point() and "running" not in k]).norm().item()

    _run(ckpt, data, tmp_path / "free", one_step, batch_size=24)
    _run(ckpt, data, tmp_path / "clipped", replace(one_step, clip_grad=1e-3), batch_size=24)
    assert update_norm(tmp_path / "free") > 1e-2
    assert update_norm(tmp_path / "clipped") <= 1e-3 * 1.001


def test_grad_accum_gives_the_update_of_the_bigger_batch(ckpt, data, tmp_path):
    two_epochs = replace(FULL, epochs=2)
    _run(ckpt, data, tmp_path / "big", two_epochs, batch_size=24)
    _run(ckpt, data, tmp_path / "accum", replace(two_epochs, grad_accum=3), batch_size=8)
    big, accum = load_file(tmp_path / "big/last.safetensors"), load_file(tmp_path / "accum/last.safetensors")
    moved = max((big[k].float() - load_file(ckpt)[k].float()).abs().max().item() for k in big)
    assert moved > 1e-3  # the runs trained
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=1e-4, atol=1e-6, msg=k)
    for run in ("big", "accum"):  # 24 images: one optimizer step per epoch either way
        state = read_state(tmp_path / run)
        assert (state["stage_step"], state["global_step"]) == (2, 2)
    rows = [read_state(tmp_path / r)["rows"] for r in ("big", "accum")]
    assert [r["lr"] for r in rows[0]][1:] == pytest.approx([r["lr"] for r in rows[1]][1:])


def test_resume_with_grad_accum_and_mixup_continues_exactly(ckpt, data, tmp_path):
    stages = (replace(FULL, name="first", epochs=1), replace(FULL, name="second", epochs=2))
    stages = tuple(replace(s, grad_accum=2, mixup=0.4, opt="adamw", lr=0.01) for s in stages)
    config = dict(batch_size=4, augment=True)  # 3 updates of 2 x 4 images per epoch
    _run(ckpt, data, tmp_path / "reference", *stages, **config)

    def ctrl_c(kind, info):
        if kind == "step" and info["stage"] == "second" and info["epoch"] == 1 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _run(ckpt, data, tmp_path / "cut", *stages, on_event=ctrl_c, **config)
    state = read_state(tmp_path / "cut")
    assert (state["stage_index"], state["epoch"], state["step_in_epoch"], state["stage_step"]) == (1, 1, 2, 5)
    resume(tmp_path / "cut")
    ref, resumed = load_file(tmp_path / "reference/last.safetensors"), load_file(tmp_path / "cut/last.safetensors")
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


# --- channels-last, drop-path ---------------------------------------------------------

def test_channels_last_trains_in_that_format_with_the_same_loss(ckpt, data, tmp_path):
    seen: list[tuple[bool, bool]] = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            fmt = torch.channels_last
            seen.append((args[0].is_contiguous(memory_format=fmt), module.weight.is_contiguous(memory_format=fmt)))

    plain, last = [], []
    _run(ckpt, data, tmp_path / "plain", FULL, on_event=lambda k, i: plain.append((k, i)))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        _run(ckpt, data, tmp_path / "cl", FULL, channels_last=True, on_event=lambda k, i: last.append((k, i)))
    finally:
        handle.remove()
    assert seen and all(x and w for x, w in seen)
    assert _losses(last) == pytest.approx(_losses(plain), rel=1e-4)


def test_drop_path_is_built_in_recorded_and_acts(ckpt, data, tmp_path):
    _run(ckpt, data, tmp_path / "dp", FULL, drop_path=0.5)
    meta = read_metadata(tmp_path / "dp/last.safetensors")
    assert meta.source["kwargs"]["drop_path_rate"] == 0.5
    model = load_checkpoint(tmp_path / "dp/last.safetensors").model.train()
    plain = load_checkpoint(ckpt).model.train()
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))  # a random depth per pass
    assert torch.equal(plain(x), plain(x))


def test_drop_path_is_refused_for_a_model_timm_did_not_build(ckpt):
    loaded = load_checkpoint(ckpt)
    meta = replace(loaded.meta, source={"spec": "torchvision:resnet18", "kwargs": {}})
    with pytest.raises(UserError, match="timm model") as e:
        with_drop_path(loaded.model, meta, 0.1)
    assert "run without --drop-path" in str(e.value)


# --- layer decay, optimizer, scheduler -----------------------------------------------

def _lr_of(optimizer, param) -> tuple[float, float]:
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return group["lr"], group["weight_decay"]


def test_layer_decay_gives_earlier_layers_smaller_rates():
    model = _gated_model()
    stage = Stage("f", "full", lr=0.01, base_lr=0.01, layer_decay=0.5, warmup=0.0)
    freeze_for_stage(model, stage)
    optimizer = make_optimizer(model, stage)
    scheduler = make_scheduler(optimizer, stage, 10)
    scheduler.step_update(0)
    stem, late, head = model.conv1[0].weight, model.layer2[0].conv1.weight, model.fc.weight
    assert _lr_of(optimizer, stem)[0] < _lr_of(optimizer, late)[0] < _lr_of(optimizer, head)[0]
    gate = model.layer2[0].conv1.gate
    assert _lr_of(optimizer, gate.beta) == (_lr_of(optimizer, late)[0], 0.0)  # beta never decays
    assert _lr_of(optimizer, gate.gamma)[0] == _lr_of(optimizer, late)[0]  # its conv's layer
    assert _lr_of(optimizer, model.conv1[0].gate.beta)[1] == 0.0
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups
               if any(p.ndim <= 1 and p is not gate.beta for p in g["params"]) and g["name"].startswith("base"))


def test_layer_decay_keeps_a_gates_stage_head_at_the_stage_rate():
    model = _gated_model()
    stage = Stage("g", "gates", lr=0.02, train_head=True, layer_decay=0.5, warmup=0.0)
    freeze_for_stage(model, stage)
    optimizer = make_optimizer(model, stage)
    make_scheduler(optimizer, stage, 10).step_update(0)
    assert _lr_of(optimizer, model.fc.weight)[0] == pytest.approx(0.02)
    assert _lr_of(optimizer, model.conv1[0].gate.gamma)[0] < 0.02
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in frozen for g in optimizer.param_groups for p in g["params"])


def test_opt_sched_warmup_and_weight_decay_reach_timm():
    model = _gated_model()
    stage = Stage("f", "full", opt="sgd", sched="step", warmup=0.5, weight_decay=1e-3)
    freeze_for_stage(model, stage)
    optimizer = make_optimizer(model, stage)
    scheduler = make_scheduler(optimizer, stage, 10)
    assert isinstance(optimizer, torch.optim.SGD)
    assert type(scheduler).__name__ == "StepLRScheduler" and scheduler.warmup_t == 5
    assert _lr_of(optimizer, model.layer1[0].conv1.weight)[1] == 1e-3
    with pytest.raises(UserError, match="unknown scheduler"):
        make_scheduler(optimizer, replace(stage, sched="nope"), 10)


# --- per-stage values, messages ------------------------------------------------------

def test_per_stage_values_from_the_command_line():
    recipe = default_recipe().override(epochs="gates=4,full=5", lr="0.3", mixup="full=0.2",
                                       grad_accum="gates=2")
    gates, full = recipe.stages
    assert (gates.epochs, full.epochs, gates.lr, full.lr) == (4, 5, 0.3, 0.3)
    assert (gates.mixup, full.mixup, gates.grad_accum, full.grad_accum) == (0.0, 0.2, 2, 1)
    with pytest.raises(UserError, match="its stages are gates, full"):
        default_recipe().override(epochs="head=2")
    with pytest.raises(UserError, match="--grad-accum 'two'.*whole number.*STAGE=VALUE"):
        default_recipe().override(grad_accum="two")
    with pytest.raises(UserError, match="--grad-accum 'gates=two'.*whole number.*STAGE=VALUE"):
        default_recipe().override(grad_accum="gates=two")


def test_nothing_to_train_names_the_next_command():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError) as e:
        freeze_for_stage(model, Stage("gates", "gates"))
    assert "gct-surgery inject MODEL" in str(e.value) and "--train-head" in str(e.value)


def test_all_knobs_together_through_the_cli(ckpt, data, tmp_path, cli):
    out = tmp_path / "run"
    args = [cli, "finetune", str(ckpt), "--data", str(data), "--out", str(out), "--img-size", "32",
            "--batch-size", "4", "--workers", "0", "--stage", "full", "--epochs", "1",
            "--smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0", "--clip-grad", "1",
            "--grad-accum", "2", "--channels-last", "--drop-path", "0.05", "--layer-decay", "0.8",
            "--opt", "sgd", "--sched", "step", "--warmup", "0.1", "--weight-decay", "1e-4",
            "--ema", "--ema-decay", "0.99", "--json"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert json.loads(proc.stdout)["epochs"] == 1
    info = json.loads((out / "run.json").read_text())
    (stage,) = info["recipe"]["stages"]
    assert {k: stage[k] for k in ("smoothing", "mixup", "cutmix", "clip_grad", "grad_accum",
                                  "layer_decay", "opt", "sched", "warmup", "weight_decay")} == {
        "smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0, "clip_grad": 1.0, "grad_accum": 2,
        "layer_decay": 0.8, "opt": "sgd", "sched": "step", "warmup": 0.1, "weight_decay": 1e-4}
    config = info["config"]
    assert (config["channels_last"], config["drop_path"], config["ema"], config["ema_decay"]) == (True, 0.05, True, 0.99)
    assert read_metadata(out / "best.safetensors").source["kwargs"]["drop_path_rate"] == 0.05
    assert read_state(out)["stage_step"] == 3  # 24 images, 2 x 4 per update


def test_an_unknown_stage_name_is_one_line_exit_2(ckpt, data, tmp_path, capsys):
    from gct_surgery.cli import run as cli_run

    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "warmup=1"]
    assert cli_run(args) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "its stages are gates, full" in err


def test_targets_are_split_for_grad_accum_and_kept_whole_without_it():
    """A task's targets may hold anything when a step takes one batch; split, they must
    be tensors (nested in lists, tuples or dicts)."""
    from gct_surgery.errors import UserError
    from gct_surgery.train.epoch import _split

    ids = [{"mask": torch.zeros(4, 2), "image_id": "a.jpg"}]
    assert _split(ids, 1) == [ids]
    parts = _split({"mask": torch.arange(4), "pair": (torch.arange(4), torch.arange(4))}, 2)
    assert [p["mask"].tolist() for p in parts] == [[0, 1], [2, 3]]
    assert parts[1]["pair"][0].tolist() == [2, 3] and isinstance(parts[1]["pair"], tuple)
    with pytest.raises(UserError, match="--grad-accum cannot split"):
        _split(ids, 2)
