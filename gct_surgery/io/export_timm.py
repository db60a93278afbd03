"""The timm folder: an ungated model as ``model.safetensors`` plus timm's ``config.json``,
so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds it with its own
head (``num_classes``), class names and preprocessing, and no gct-surgery.

The config is timm's own (``save_config_for_hf``), with the checkpoint's recorded
preprocessing as its data config. The folder is written as a temp folder beside the
output, loaded back through timm and compared with the model bit for bit before it
takes the output's name. timm cannot build gates, so a model that still has some is
refused (``--unload`` or ``--fold`` first), as is an architecture timm does not own.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core.forward import max_difference, run_model
from ..core.heads import model_num_classes
from ..errors import UserError
from .atomic import atomic_folder
from .export_format import ExportResult, check
from .metadata import CheckpointMeta
from .safetensors_file import dedupe_shared, restore_aliases

WEIGHTS_FILE = "model.safetensors"  # the names timm's local-dir loader reads
CONFIG_FILE = "config.json"
_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def refuse_unless_timm(meta: CheckpointMeta, checkpoint, output: Path) -> str:
    """The timm architecture the checkpoint was built from; a one-line refusal else."""
    spec = str(meta.source.get("spec", ""))
    if not spec.startswith("timm:"):
        raise UserError(f"a timm folder needs a timm architecture, and {checkpoint} was built from "
                        f"{spec or 'an unrecorded source'}; export -o {output}.pt2 (plain torch) "
                        f"or -o {output}.safetensors --unload (a state dict) instead")
    return spec[len("timm:"):]


def refuse_gates(gate_count: int, form: str, output: Path) -> None:
    """timm builds no gates: a folder holds an unloaded or fully folded model only."""
    if not gate_count:
        return
    if form == "fold":
        raise UserError(f"--fold kept {gate_count} gates (gamma not ~0) and timm cannot build "
                        f"gates; add --unload instead of --fold (the output changes), or export "
                        f"-o {output}.pt2 to keep them")
    raise UserError(f"timm cannot build gates and this model has {gate_count}; add --unload "
                    f"(removes them) or --fold (folds those with gamma ~ 0), or export "
                    f"-o {output}.pt2 to keep them")


def export_timm_folder(model: nn.Module, meta: CheckpointMeta, x, output: Path, expected,
                       reference, result: ExportResult) -> None:
    """Write, reload through timm's ``local-dir:`` loader, compare, then rename into place."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    classes = model_num_classes(model)
    names = meta.data.get("class_names")
    model_config = {"label_names": list(names)} if names and len(names) == classes else {}
    data_config = {k: meta.data[k] for k in _DATA_KEYS if meta.data.get(k) is not None}
    # timm's loader wants every key, and safetensors refuses shared storage: tied
    # weights are written once per name.
    tensors, aliases = dedupe_shared(model.state_dict())
    tensors = restore_aliases({k: v.cpu() for k, v in tensors.items()}, aliases)
    tensors.update({k: tensors[k].clone() for k in aliases})
    with atomic_folder(output) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        try:
            save_config_for_hf(model, str(tmp / CONFIG_FILE), model_config=model_config,
                               data_config=data_config)
            reloaded = timm.create_model(f"local-dir:{tmp}", pretrained=True)
        except (TypeError, ValueError, RuntimeError, KeyError) as e:  # an older timm, an odd model
            raise UserError(f"timm could not write or rebuild this model as a folder "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                            "upgrade timm (pip install -U timm), or export -o "
                            f"{output}.pt2 instead") from None
        if model_num_classes(reloaded) != classes:
            raise UserError(f"timm rebuilt the folder with {model_num_classes(reloaded)} classes, "
                            f"not {classes}; upgrade timm (pip install -U timm)")
        got = run_model(reloaded, x)
        check(max_difference(expected, got), 0.0, "the timm folder")
        result.max_abs_diff = max_difference(reference, got)
        result.files = sorted(p.name for p in tmp.iterdir())
    result.size_bytes = sum(p.stat().st_size for p in output.iterdir() if p.name in result.files)
