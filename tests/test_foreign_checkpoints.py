"""Files other tools write, injected as a user would: timm train.py's ``.pth.tar``,
Lightning's ``.ckpt``, DDP / torch.compile prefixes, half precision, timm's
``local-dir:``; and the hints that say the next command. The CLI runs through its entry
point in this process (``here``); the Hub case, which reads its cache at start-up, as a
subprocess."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import pytest
import timm
import torch
from timm.utils import CheckpointSaver, ModelEmaV3

import gct_surgery
from conftest import cli_here as here, cli_path
from gct_surgery.io.checkpoint import read_metadata

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def run(*args, cwd=None, env=None):
    """The command as a subprocess (``env``: what it must read when it starts)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def small(name="test_resnet", num_classes=7, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """What timm's train.py leaves: model_best.pth.tar from timm's own CheckpointSaver,
    with args (a Namespace) and EMA weights that differ from the raw ones."""
    folder = tmp_path_factory.mktemp("timm-train")
    model = small("resnet10t")
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(0.05)
    args = argparse.Namespace(model="resnet10t", num_classes=7, lr=0.1, sched="cosine",
                              mean=None, drop_path=None, input_size=(3, 32, 32))
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            model_ema=ema, checkpoint_dir=str(folder), decreasing=False)
    saver.save_checkpoint(epoch=3, metric=71.5)
    assert (folder / "model_best.pth.tar").is_file()
    return folder, model, ema.module.eval()


def test_timm_train_checkpoint_injects_with_no_flags(timm_run, tmp_path):
    folder, model, ema = timm_run
    src = tmp_path / "model_best.pth.tar"
    shutil.copy(folder / "model_best.pth.tar", src)
    proc = here("inject", src, "--input-size", "3,32,32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "model_best.gct.safetensors"
    assert str(out.name) in proc.stdout and out.is_file()
    assert "this file also holds ema weights; --use-ema takes them" in proc.stdout.lower()
    meta = read_metadata(out)
    assert meta.source == {"spec": "timm:resnet10t", "kwargs": {"num_classes": 7}}
    assert (outputs(gct_surgery.load(out)) - outputs(model)).abs().max() < 1e-5

    again = here("inject", src, "--input-size", "3,32,32", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {out} already exists; pass -o OTHER.safetensors to write elsewhere (or -o {out} "
        "to replace it)"]


def test_use_ema_takes_the_ema_weights(timm_run, tmp_path):
    folder, model, ema = timm_run
    out = tmp_path / "ema.safetensors"
    proc = here("inject", folder / "model_best.pth.tar", "--use-ema", "-o", out, "--input-size", "3,32,32")
    assert proc.returncode == 0, proc.stderr
    got = outputs(gct_surgery.load(out))
    assert (got - outputs(ema)).abs().max() < 1e-5
    assert (got - outputs(model)).abs().max() > 1e-2  # the raw weights did not arrive
    assert read_metadata(out).history[0]["use_ema"] is True


class Payload:
    """An object that creates a file when unpickled: proof that nothing ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_arbitrary_object_in_a_pth_tar_is_still_refused(timm_run, tmp_path):
    folder, model, _ = timm_run
    marker = tmp_path / "MARKER"
    doc = {"arch": "resnet10t", "state_dict": model.state_dict(), "version": 2,
           "args": argparse.Namespace(model="resnet10t"), "extra": Payload(marker)}
    torch.save(doc, tmp_path / "hostile.pth.tar")
    proc = here("inject", tmp_path / "hostile.pth.tar", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--allow-pickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "hostile.gct.safetensors").exists()


def test_lightning_checkpoint_injects(tmp_path):
    model = small()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(7)  # a loss module saved beside the network
    torch.save({"epoch": 4, "global_step": 40, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"lr": 0.01}, "optimizer_states": [],  # classes: from the head
                "lr_schedulers": []}, tmp_path / "epoch=4.ckpt")
    proc = here("inject", tmp_path / "epoch=4.ckpt", "--arch", "timm:test_resnet", "--input-size", "3,32,32")
    assert proc.returncode == 0, proc.stderr
    assert "took the weights under 'model.'" in proc.stdout
    out = tmp_path / "epoch=4.gct.safetensors"
    assert torch.equal(outputs(gct_surgery.load(out)), outputs(model))


@pytest.mark.parametrize("wrap", ["module", "_orig_mod", "compiled-ddp", "fp16", "bf16"])
def test_wrapped_and_half_precision_state_dicts_inject(tmp_path, wrap):
    """The CLI in this process (the same entry point as the console script): five
    subprocesses would cost half a minute of CPU for the same code path."""
    from gct_surgery.cli import run as cli_run

    model = small()
    state = model.state_dict()
    if wrap in ("fp16", "bf16"):
        dtype = torch.float16 if wrap == "fp16" else torch.bfloat16
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)  # the reference: the same rounded weights, in float
    else:
        prefix = {"module": "module.", "_orig_mod": "_orig_mod.", "compiled-ddp": "_orig_mod.module."}[wrap]
        state = {prefix + k: v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pth")
    assert cli_run(["inject", str(tmp_path / "w.pth"), "--arch", "timm:test_resnet",
                    "--input-size", "3,32,32"]) == 0
    loaded = gct_surgery.load(tmp_path / "w.gct.safetensors")
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(outputs(loaded), outputs(model))


def test_a_state_dict_with_arch_alone_writes_beside_it(tmp_path):
    model = small()
    (tmp_path / "models").mkdir()
    torch.save(model.state_dict(), tmp_path / "models" / "model.pt")
    proc = here("inject", "models/model.pt", "--arch", "timm:test_resnet", "--input-size", "3,32,32",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "models/model.gct.safetensors" in proc.stdout  # the path it chose, printed
    out = tmp_path / "models" / "model.gct.safetensors"
    assert read_metadata(out).source["kwargs"] == {"num_classes": 7}  # from the classifier's shape
    assert torch.equal(outputs(gct_surgery.load(out)), outputs(model))


def test_architecture_names_are_suggested(tmp_path):
    torch.save(small().state_dict(), tmp_path / "model.pt")
    bare = here("inject", tmp_path / "model.pt", "--arch", "mobilenetv3_small_050", cwd=tmp_path)
    assert bare.returncode == 2
    assert bare.stderr.strip().endswith("did you mean --arch timm:mobilenetv3_small_050?")
    typo = here("inject", "timm:mobilenetv3_smal_050", "--dry-run", cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean timm:mobilenetv3_small_050" in typo.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"]


def test_random_weights_warn_and_a_weights_file_does_not(tmp_path):
    proc = here("inject", "timm:test_resnet", "--input-size", "3,32,32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "test_resnet.gct.safetensors").is_file()  # the default name, here
    assert ("warning: timm:test_resnet has random weights (no --weights, no --pretrained): give your "
            "trained file (`gct-surgery inject FILE --arch timm:test_resnet`)") in proc.stderr
    torch.save(small(num_classes=1000).state_dict(), tmp_path / "w.pth")
    given = here("inject", "timm:test_resnet", "--weights", tmp_path / "w.pth", "--dry-run", cwd=tmp_path)
    assert given.returncode == 0, given.stderr
    assert "random weights" not in given.stderr


def test_local_dir_source_is_recorded_portably(tmp_path, monkeypatch):
    from timm.models import save_for_hf

    model = small(num_classes=5)
    save_for_hf(model, str(tmp_path / "hub"), safe_serialization=True)
    proc = here("inject", "timm:local-dir:hub", "--input-size", "3,32,32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "hub.gct.safetensors"
    assert read_metadata(out).source == {"spec": "timm:test_resnet",
                                         "kwargs": {**read_metadata(out).source["kwargs"], "num_classes": 5}}
    shutil.rmtree(tmp_path / "hub")  # the checkpoint needs neither the folder nor the network
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert torch.equal(outputs(gct_surgery.load(out)), outputs(model))


def test_hf_hub_offline_without_a_cached_copy_says_what_to_do(tmp_path):
    proc = run("inject", "timm:hf-hub:timm/resnet18.a1_in1k", "--dry-run", cwd=tmp_path,
               env={"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: timm:hf-hub:timm/resnet18.a1_in1k is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set; download it once with the network on, or save it to a folder and "
        "pass timm:local-dir:PATH"]


def test_hints_name_the_next_command(ckpt, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ckpt, run_dir / "best.safetensors")
    proc = here("inspect", run_dir)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {run_dir} is a run folder, not a checkpoint: use {run_dir / 'best.safetensors'}"]
    with pytest.raises(gct_surgery.errors.CheckpointError, match="use .*best.safetensors"):
        gct_surgery.load(run_dir)

    torch.save(small().state_dict(), tmp_path / "model.pt")
    proc = here("finetune", tmp_path / "model.pt", "--data", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert f"first `gct-surgery inject {tmp_path / 'model.pt'} --arch timm:NAME`" in line
    assert f"then use the {tmp_path / 'model.gct.safetensors'} it writes" in line


def test_a_torchvision_file_from_before_num_batches_tracked_loads_with_its_batchnorm(tmp_path):
    """torchvision's early weight files (resnet50-19c8e357.pth...) have no
    ``num_batches_tracked``: torch fills it, and the model keeps plain BatchNorm2d
    (only a detector's norms saved that way were trained frozen)."""
    import torchvision

    from gct_surgery.operations import open_model

    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=5).eval()
    trained.bn1.running_mean.uniform_(-1, 1)
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "resnet18-old.pth")
    model, meta = open_model(str(tmp_path / "resnet18-old.pth"), arch="torchvision:resnet18")
    assert type(model.bn1) is torch.nn.BatchNorm2d and meta.source["kwargs"]["num_classes"] == 5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x))
