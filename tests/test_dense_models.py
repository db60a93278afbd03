"""torchvision's detection and segmentation builders, offline: they never fetch a
backbone, and inject, export (full and gates-only), load and inspect work on them with
outputs unchanged bit for bit (boxes, scores and labels included)."""
from __future__ import annotations

import copy

import pytest
import torch

from gct_surgery import load
from gct_surgery.analysis import inspect_checkpoint
from gct_surgery.core.model import run_model
from gct_surgery.core.surgery import gated_modules
from gct_surgery.io.checkpoint import save
from gct_surgery.io.export import export
from gct_surgery.io.metadata import CheckpointMeta
from gct_surgery.io.sources import ModelSource, build_model, model_data_config
from gct_surgery.operations import inject_model

SMALL = {"min_size": 64, "max_size": 64}  # detection transforms resize to this
LIGHT = [("lraspp_mobilenet_v3_large", {"num_classes": 3}),
         ("fasterrcnn_mobilenet_v3_large_320_fpn", SMALL)]
HEAVY = [("deeplabv3_mobilenet_v3_large", {"num_classes": 4, "aux_loss": True}),
         ("ssdlite320_mobilenet_v3_large", {"num_classes": 5}),
         ("fcn_resnet50", {"num_classes": 2}), ("deeplabv3_resnet50", {"num_classes": 2}),
         ("fasterrcnn_resnet50_fpn", SMALL), ("retinanet_resnet50_fpn", SMALL),
         ("maskrcnn_resnet50_fpn", SMALL), ("keypointrcnn_resnet50_fpn", SMALL)]
CASES = LIGHT + [pytest.param(*c, marks=pytest.mark.slow) for c in HEAVY]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in LIGHT + HEAVY])
def test_builder_offline_inject_export_load_inspect(name, kwargs, tmp_path):
    torch.manual_seed(0)
    source = ModelSource(f"torchvision:{name}", kwargs)
    model = build_model(source).eval()  # HF_HUB_OFFLINE and no network: nothing fetched
    meta = CheckpointMeta(source=source.to_dict(), gate={}, gated=[],
                          data=model_data_config(model))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before, base = run_model(model, x), copy.deepcopy(model)
    result = inject_model(model, meta, input_size=[3, 64, 64])
    assert result.report.gates_total > 0 and len(gated_modules(model)) == result.report.gates_total
    after = run_model(model, x)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    ckpt = tmp_path / "gated.safetensors"
    save(model, ckpt, result.meta)
    full = export(ckpt, tmp_path / "full.safetensors")
    adapter = export(ckpt, tmp_path / "gates.safetensors", gates_only=True, base=base)
    assert full.gates == adapter.gates == result.report.gates_total
    assert adapter.size_bytes < full.size_bytes / 5
    again = run_model(load(tmp_path / "full.safetensors"), x)
    assert all(torch.equal(a, b) for a, b in zip(after, again))
    assert len(inspect_checkpoint(ckpt).rows) == result.report.gates_total


@pytest.mark.parametrize("name,heads", [("lraspp_mobilenet_v3_large", 2),
                                        ("deeplabv3_mobilenet_v3_large", 2)])
def test_num_classes_replaces_every_segmentation_head_and_keeps_its_gate(name, heads):
    from gct_surgery.core.model import dense_heads, model_num_classes, replace_head

    kwargs = {"aux_loss": True} if name.startswith("deeplab") else {}
    source = ModelSource(f"torchvision:{name}", kwargs)
    model = build_model(source).eval()
    meta = CheckpointMeta(source=source.to_dict(), gate={}, gated=[], data={})
    inject_model(model, meta, input_size=[3, 64, 64], verify=False)
    gated = len(gated_modules(model))
    assert model_num_classes(model) == 21 and len(dense_heads(model)) == heads
    replace_head(model, 3)
    assert model_num_classes(model) == 3 and len(gated_modules(model)) == gated
    out = model(torch.rand(1, 3, 64, 64))
    assert all(v.shape == (1, 3, 64, 64) for v in out.values())


def test_an_empty_batch_passes_a_gate():
    """A detector's heads see no boxes on some images: (0, C, H, W) goes through."""
    from gct_surgery.core.gate import GCT

    gate = GCT(4)
    torch.nn.init.normal_(gate.gamma)
    x = torch.zeros(0, 4, 5, 5, requires_grad=True)
    y = gate(x)
    y.sum().backward()
    assert y.shape == x.shape and gate.gamma.grad.abs().sum() == 0


def test_a_segmentation_weights_file_gives_its_classes_and_aux_head(tmp_path):
    """A file trained with torchvision's --aux-loss and 5 classes: both from the file."""
    from safetensors.torch import save_file

    import gct_surgery.cli

    source = ModelSource("torchvision:deeplabv3_mobilenet_v3_large",
                         {"num_classes": 5, "aux_loss": True})
    trained = build_model(source).eval()
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, tmp_path / "seg.safetensors")
    out = tmp_path / "seg.gct.safetensors"
    code = gct_surgery.cli.run(["inject", str(tmp_path / "seg.safetensors"), "--arch",
                                "torchvision:deeplabv3_mobilenet_v3_large", "-o", str(out)])
    assert code == 0
    x = torch.rand(1, 3, 64, 64)
    got, want = load(out)(x), trained(x)
    assert set(got) == {"out", "aux"} and got["out"].shape[1] == 5
    assert torch.equal(got["out"], want["out"]) and torch.equal(got["aux"], want["aux"])


def test_a_detector_trained_with_frozen_batchnorm_loads_strictly_and_stays_frozen(tmp_path):
    """torchvision gives a detector that starts from pretrained weights FrozenBatchNorm2d
    in its backbone; built offline it gets BatchNorm2d. A user's file of such a model
    (no ``num_batches_tracked``) loads with its norms frozen again, through inject, the
    gated checkpoint and its reload, and training never moves their statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from gct_surgery.io.checkpoint import load_checkpoint
    from gct_surgery.operations import open_model

    def frozen(model):
        return [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    trained = build_model(ModelSource(f"torchvision:{name}", SMALL)).eval()
    norms = [n for n, m in trained.backbone.named_modules() if type(m) is torch.nn.BatchNorm2d]
    for n in norms:  # what torchvision builds when the backbone starts pretrained
        parent, _, child = f"backbone.{n}".rpartition(".")
        bn = trained.get_submodule(f"backbone.{n}")
        fbn = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        fbn.running_mean.uniform_(-0.1, 0.1)
        setattr(trained.get_submodule(parent), child, fbn)
    path = tmp_path / "detector.pth"
    torch.save(trained.state_dict(), path)
    assert not any(k.endswith("num_batches_tracked") and k.startswith("backbone.")
                   for k in trained.state_dict())

    model, meta = open_model(str(path), arch=f"torchvision:{name}")
    assert frozen(model) == frozen(trained) and len(norms) > 40
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = run_model(trained, x)
    assert all(torch.equal(a, b) for a, b in zip(run_model(model.eval(), x), want))
    result = inject_model(model, meta, input_size=[3, 64, 64])
    save(model, tmp_path / "gated.safetensors", result.meta)
    again = load_checkpoint(tmp_path / "gated.safetensors").model
    assert frozen(again) == frozen(trained)
    stats = again.backbone.body.get_submodule("0.1").running_mean.clone()
    again.train()(torch.rand(2, 3, 64, 64), [{"boxes": torch.tensor([[4.0, 4, 30, 30]]),
                                              "labels": torch.tensor([1])}] * 2)
    assert torch.equal(again.backbone.body.get_submodule("0.1").running_mean, stats)

    # Only the norms saved without a batch count: one kept training (a v2 detector's FPN)
    state = trained.state_dict()
    state["backbone.body.1.block.0.1.num_batches_tracked"] = torch.tensor(5)
    torch.save(state, path)
    mixed, _ = open_model(str(path), arch=f"torchvision:{name}")
    assert set(frozen(trained)) - set(frozen(mixed)) == {"backbone.body.1.block.0.1"}
    assert type(mixed.get_submodule("backbone.body.1.block.0.1")) is torch.nn.BatchNorm2d


def test_deeplabv3_with_one_image_per_batch_is_one_line(tmp_path, capsys):
    """DeepLabV3's ASPP pools to 1x1 before a BatchNorm: torch refuses to train that on
    one image (with BN statistics updating: ``freeze_bn = false``). The run says so, and
    which --batch-size works, in one line."""
    import gct_surgery.cli
    from test_dense import write_segmentation_folder

    data = write_segmentation_folder(tmp_path / "data", n=2, size=32)
    gated = tmp_path / "deeplab.safetensors"
    assert gct_surgery.cli.run(["inject", "torchvision:deeplabv3_mobilenet_v3_large",
                                "--num-classes", "3", "--input-size", "3,32,32",
                                "-o", str(gated)]) == 0
    capsys.readouterr()
    recipe = tmp_path / "bn.toml"
    recipe.write_text('[[stage]]\nname = "full"\nkind = "full"\nepochs = 1\nlr = 1e-3\n'
                      'freeze_bn = false\n')
    code = gct_surgery.cli.run(["finetune", str(gated), "--data", str(data), "--task",
                                "segmentation", "--recipe", str(recipe),
                                "--batch-size", "1", "--workers", "0", "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "cannot train on a batch of 1 image(s)" in err and "--batch-size 2 or more" in err


def test_pretrained_backbone_from_a_local_file_never_fetches(tmp_path, capsys):
    """``--pretrained --weights FILE``: FILE is the backbone's classification weights (what
    ``weights_backbone`` would download), read safely; a detector's backbone then has
    FrozenBatchNorm2d as torchvision gives it. ``--pretrained`` alone is one line."""
    from safetensors.torch import save_file
    from torchvision.ops.misc import FrozenBatchNorm2d

    import gct_surgery.cli
    from gct_surgery.operations import open_model

    torch.manual_seed(0)
    classifier = build_model(ModelSource("torchvision:mobilenet_v3_large")).eval()
    path = tmp_path / "mobilenet_v3_large.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)
    for name, frozen_norms in (("lraspp_mobilenet_v3_large", 0),
                               ("fasterrcnn_mobilenet_v3_large_320_fpn", 46)):
        model, _ = open_model(f"torchvision:{name}", weights=str(path), pretrained=True)
        body = getattr(model.backbone, "body", model.backbone)
        conv = body.get_submodule("1.block.0.0")
        assert torch.equal(conv.weight, classifier.features[1].block[0][0].weight)
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == frozen_norms
    code = gct_surgery.cli.run(["inject", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                                "--pretrained", "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "add --weights PATH" in err
    code = gct_surgery.cli.run(["inject", "torchvision:lraspp_mobilenet_v3_large", "--pretrained",
                                "--weights", str(path.with_name("other.safetensors")), "-o",
                                str(tmp_path / "y.safetensors")])
    assert code == 2
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    code = gct_surgery.cli.run(["inject", "torchvision:lraspp_mobilenet_v3_large", "--pretrained",
                                "--weights", str(tmp_path / "other.safetensors"), "-o",
                                str(tmp_path / "y.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not hold the backbone of torchvision:lraspp" in err, err
    code = gct_surgery.cli.run(["inject", "torchvision:ssdlite320_mobilenet_v3_large",
                                "--pretrained", "--weights", str(path), "-o",
                                str(tmp_path / "z.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "under other names; give the whole model's weights" in err, err
