"""Checkpoints other tools write: recognising them and taking out the weights.

=====================  ==========================================================
timm ``train.py``      ``{"state_dict", "state_dict_ema", "arch", "args", ...}``
                       (``model_best.pth.tar``): the file names its architecture
                       and class count; ``use_ema`` takes the EMA weights
Lightning ``.ckpt``    ``{"state_dict": {"model.conv1.weight": ...},
                       "hyper_parameters": {...}}``: the prefix that makes the keys
                       fit the model is stripped (``fit_prefix``)
DDP, torch.compile     ``module.`` / ``_orig_mod.`` prefixes (``state_dicts``)
fp16 / bf16            loaded into the float model (``load_state_dict`` casts)
=====================  ==========================================================

timm's ``args`` is an ``argparse.Namespace``: it is read with ``weights_only=True``
and Namespace allowed (``state_dicts.read_torch_file``), never by a full unpickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.heads import classifier_name
from ..errors import SourceError
from .safetensors_file import is_safetensors, read_tensors
from .state_dicts import load_weights, read_torch_file, require_file, unwrap_state_dict

EMA_KEYS = ("state_dict_ema", "model_ema")  # timm's train.py; timm's loader also knows model_ema
_ARCH_HPARAMS = ("arch", "model_name", "model", "architecture", "backbone")  # Lightning habits


@dataclass(frozen=True)
class WeightsFile:
    """The weights a file holds, and what the file says about them."""

    tensors: dict
    trainer: str = ""  # "timm train.py", "Lightning", "pickled module", or "" (a state dict)
    arch: str | None = None  # "timm:NAME" when the file names a timm architecture
    num_classes: int | None = None  # from the file's training arguments
    has_ema: bool = False
    used_ema: bool = False


def read_weights_file(path: str | os.PathLike, *, use_ema: bool = False,
                      allow_pickle: bool = False) -> WeightsFile:
    """The weights in a state-dict file or another trainer's checkpoint.

    ``use_ema`` takes the EMA weights (timm's ``state_dict_ema``); a file without them
    is an error rather than a silent fallback to the raw weights.
    """
    path = Path(path)
    require_file(path)
    if is_safetensors(path):
        if use_ema:
            raise SourceError(f"{path} is a safetensors file with one set of weights, no EMA; "
                              "drop --use-ema")
        return WeightsFile(read_tensors(path))
    obj = read_torch_file(path, allow_pickle=allow_pickle)
    ema_key = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
    if use_ema and ema_key is None:
        raise SourceError(f"{path} holds no EMA weights (no {' or '.join(EMA_KEYS)}); drop --use-ema")
    if isinstance(obj, nn.Module):
        return WeightsFile(unwrap_state_dict(obj, path), trainer="pickled module")
    tensors = unwrap_state_dict(obj[ema_key] if use_ema else obj, path)
    if not isinstance(obj, dict):
        return WeightsFile(tensors)
    return WeightsFile(tensors, trainer=_trainer(obj), arch=_arch(obj), num_classes=_num_classes(obj),
                       has_ema=ema_key is not None, used_ema=use_ema)


def _trainer(obj: dict) -> str:
    if "pytorch-lightning_version" in obj or "hyper_parameters" in obj:
        return "Lightning"
    if "state_dict_ema" in obj or ("arch" in obj and "state_dict" in obj):
        return "timm train.py"
    return ""


def _settings(obj: dict) -> dict:
    """The training arguments a file carries: timm's ``args`` or Lightning's hparams."""
    args = obj.get("args")
    settings = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, dict) else {}
    hparams = obj.get("hyper_parameters")
    return {**(hparams if isinstance(hparams, dict) else {}), **settings}


def _arch(obj: dict) -> str | None:
    """``timm:NAME`` when the file names a model timm knows (timm's ``arch``, its
    ``args.model``, a Lightning hparam); a name timm does not know is not a guess."""
    import timm

    settings = _settings(obj)
    names = [obj.get("arch"), *(settings.get(k) for k in _ARCH_HPARAMS)]
    for name in names:
        if isinstance(name, str) and name and timm.is_model(name.split(".")[0]):
            return f"timm:{name}"
    return None


def _num_classes(obj: dict) -> int | None:
    n = _settings(obj).get("num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def classes_in(model: nn.Module, tensors: dict, fallback: int | None = None) -> int | None:
    """The class count of the file's classifier (the row count of the weight under the
    model's head name), else ``fallback`` (the file's ``num_classes`` argument)."""
    head = classifier_name(model)
    weight = tensors.get(f"{head}.weight") if head else None
    if weight is not None and weight.ndim >= 2:
        return int(weight.shape[0])
    return fallback


def fit_prefix(model: nn.Module, tensors: dict) -> tuple[dict, str | None]:
    """The tensors under the one key prefix (``model.``, ``net.``, ``model.backbone.``)
    whose keys are exactly the model's, with that prefix stripped: a Lightning module
    saves its network under the attribute it was stored as, beside other modules (a
    loss, a teacher). Unchanged, with None, when the keys already fit or nothing does."""
    expected = set(model.state_dict())
    if expected <= set(tensors):
        return tensors, None
    prefixes = {".".join(k.split(".")[:depth]) + "." for k in tensors
                for depth in (1, 2) if k.count(".") >= depth}
    for prefix in sorted(prefixes, key=len):
        inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(inner) == expected:
            return inner, prefix
    return tensors, None


def load_file_weights(model: nn.Module, tensors: dict, what: str) -> str | None:
    """Load a file's weights into the model (``load_weights``' messages on a mismatch);
    the prefix that had to be stripped, if any."""
    tensors, prefix = fit_prefix(model, tensors)
    load_weights(model, tensors, what=what)
    return prefix


def describe(weights: WeightsFile) -> dict[str, Any]:
    """What the file was, for the checkpoint's history."""
    return {k: v for k, v in (("trainer", weights.trainer), ("arch", weights.arch),
                              ("ema", weights.used_ema)) if v}
