"""Weights files: reading a state dict out of whatever a trainer wrote, and loading it
into a model with messages that name the first mismatching keys and shapes.

=====================  ==========================================================
timm ``train.py``      ``{"state_dict", "state_dict_ema", "arch", "args", ...}``
                       (``model_best.pth.tar``): the file names its architecture
                       and class count; ``use_ema`` takes the EMA weights
Lightning ``.ckpt``    ``{"state_dict": {"model.conv1.weight": ...}, ...}``: the
                       prefix that makes the keys fit the model is stripped
DDP, torch.compile     ``module.`` / ``_orig_mod.``: timm's ``clean_state_dict``
fp16 / bf16            loaded into the float model (``load_state_dict`` casts)
=====================  ==========================================================

torch files load with ``weights_only=True`` (``argparse.Namespace`` allowed, as timm's
loader allows it: timm's ``args``) unless the user passed ``allow_pickle`` for a path
they typed: a pickle can run code, and a downloaded checkpoint is untrusted data.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.model import classifier_name, head_name
from ..core.surgery import is_gate_parameter
from ..errors import CheckpointError, SourceError, first_line

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
EMA_KEYS = ("state_dict_ema", "model_ema")  # timm's train.py; timm's loader also knows model_ema
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")  # timm's two, then PyTorch's tutorial's
_ARCH_HPARAMS = ("arch", "model_name", "model", "architecture", "backbone")  # Lightning habits


def _kind(path: str | os.PathLike) -> str:
    """What a file holds by its first bytes, whatever its name says: ``"safetensors"``
    (a header size, then the JSON header), ``"torch.save zip file"``, ``"pickle"`` or ""."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch.save zip file"
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # PROTO n
    return "pickle" if pickled else ""


def is_safetensors(path: str | os.PathLike) -> bool:
    """By content, or by a .safetensors name when the content says nothing else (a
    gct-surgery checkpoint renamed to .pt is still one; a torch file named .safetensors
    is not)."""
    kind = _kind(path)
    return kind == "safetensors" or (not kind and Path(path).suffix == ".safetensors")


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, then: str = ""):
    """``safetensors.safe_open``, the format's own reader, which validates the header
    before any tensor byte is read; whatever it refuses is one line naming the file (a
    torch file's with ``then``, what to do with it)."""
    from safetensors import safe_open

    kind = _kind(path)  # a folder: "cannot read it"
    if kind and kind != "safetensors":
        raise CheckpointError(f"{path} is not a safetensors file (it is a {kind}; a plain state "
                              f"dict goes with --arch){then}")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except Exception as e:  # safetensors' SafetensorError, or a dtype torch lacks
        reason = first_line(e).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{path} is not a safetensors file torch can read ({reason[:200]}; "
                              "truncated?)") from None


def read_header(path: str | os.PathLike, then: str = "") -> tuple[dict[str, list], dict[str, str]]:
    """``({tensor: shape}, metadata)`` of a safetensors file; no tensor is read."""
    with open_safetensors(path, then) as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata() or {}


def read_tensors(path: str | os.PathLike) -> dict:
    """Every tensor of a safetensors file, on the CPU."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def require_file(path: str | os.PathLike) -> None:
    """A file the user named must exist and be a file."""
    if not Path(path).is_file():
        raise SourceError(f"{'not a file' if Path(path).exists() else 'no such file'}: {path}")


@dataclass(frozen=True)
class WeightsFile:
    """The weights a file holds, and what the file says about them."""

    tensors: dict
    trainer: str = ""  # "timm train.py", "Lightning", "pickled module", or "" (a state dict)
    arch: str | None = None  # "timm:NAME" when the file names a timm architecture
    num_classes: int | None = None  # from the file's training arguments
    has_ema: bool = False

    def describe(self, used_ema: bool) -> dict[str, Any]:
        """What the file was, for the checkpoint's history."""
        return {k: v for k, v in (("trainer", self.trainer), ("arch", self.arch),
                                  ("ema", used_ema)) if v}


def read_weights_file(path: str | os.PathLike, *, use_ema: bool = False,
                      allow_pickle: bool = False) -> WeightsFile:
    """The weights in a state-dict file or another trainer's checkpoint, by its bytes
    (not its name). ``use_ema`` takes the EMA weights; a file without them is an error
    rather than a silent fallback to the raw weights."""
    require_file(path)
    if is_safetensors(path):
        if use_ema:
            raise SourceError(f"{path} is a safetensors file with one set of weights, no EMA; "
                              "drop --use-ema")
        return WeightsFile(read_tensors(path))
    obj = read_torch_file(path, allow_pickle=allow_pickle)
    held = obj if isinstance(obj, dict) else {}  # timm's unwrapping: EMA, state_dict, model
    ema = next((k for k in EMA_KEYS if isinstance(held.get(k), dict)), None)
    if use_ema and ema is None:
        raise SourceError(f"{path} holds no EMA weights (no {' or '.join(EMA_KEYS)}); "
                          "drop --use-ema")
    key = ema if use_ema else next(
        (k for k in WRAPPER_KEYS if isinstance(held.get(k), (dict, nn.Module))), None)
    inner = held[key] if key else obj
    tensors = _named_tensors(inner.state_dict() if isinstance(inner, nn.Module) else inner, path)
    settings = _settings(held)
    classes = settings.get("num_classes")
    trainer = "pickled module" if isinstance(obj, nn.Module) else _trainer(held)
    return WeightsFile(tensors, trainer=trainer,
                       arch=_arch(held, settings), has_ema=ema is not None,
                       num_classes=classes if type(classes) is int and classes > 0 else None)


def read_torch_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """What a torch file holds, read with ``weights_only=True`` unless ``allow_pickle``."""
    import argparse

    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise around one clear line
            warnings.simplefilter("ignore")
            with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
                # a file object: torch would go by a .safetensors name
                return torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises many types on corrupt zips/pickles
        if not allow_pickle and isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
            raise CheckpointError(
                f"{path} holds objects that only a full unpickle can build, and unpickling runs "
                "code from the file; refused. Pass --allow-pickle only if you trust it") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{first_line(e)[:200]})") from None


def _named_tensors(obj: Any, path: str | os.PathLike) -> dict:
    """The ``{name: tensor}`` of a state dict, without timm's DDP / compile prefixes."""
    from timm.models import clean_state_dict

    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
               } if isinstance(obj, dict) else {}
    if not tensors:
        held = (f"top-level keys: {', '.join(repr(k) for k in list(obj)[:5]) or 'none'}"
                if isinstance(obj, dict) else f"it holds a {type(obj).__name__}")
        raise CheckpointError(f"{path} does not hold a state dict of named tensors ({held:.200}); "
                              "save one with torch.save(model.state_dict(), PATH)")
    return clean_state_dict(tensors)


def _trainer(obj: dict) -> str:
    if "pytorch-lightning_version" in obj or "hyper_parameters" in obj:
        return "Lightning"
    timm_train = "state_dict_ema" in obj or ("arch" in obj and "state_dict" in obj)
    return "timm train.py" if timm_train else ""


def _settings(obj: dict) -> dict:
    """The training arguments a file carries: timm's ``args`` or Lightning's hparams."""
    args, hparams = obj.get("args"), obj.get("hyper_parameters")
    settings = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, dict) else {}
    return {**(hparams if isinstance(hparams, dict) else {}), **settings}


def _arch(obj: dict, settings: dict) -> str | None:
    """``timm:NAME`` when the file names a model timm knows (timm's ``arch``, its
    ``args.model``, a Lightning hparam); a name timm does not know is not a guess."""
    import timm

    for name in (obj.get("arch"), *(settings.get(k) for k in _ARCH_HPARAMS)):
        if isinstance(name, str) and name and timm.is_model(name.split(".")[0]):
            return f"timm:{name}"
    return None


def classes_in(model: nn.Module, tensors: dict, fallback: int | None = None) -> int | None:
    """The class count of the file's classifier (the row count of the weight under the
    model's head name, a Lightning prefix stripped), else ``fallback`` (the file's
    ``num_classes`` argument)."""
    head = head_name(model)
    weight = _fitted(model, tensors)[0].get(f"{head}.weight") if head else None
    if weight is not None and weight.ndim >= 2:
        return int(weight.shape[0])
    # a recorded count is believed only where some tensor has that many rows (a file
    # cannot make the tool allocate a head larger than what it holds)
    rows = {int(t.shape[0]) for t in tensors.values() if getattr(t, "ndim", 0)}
    return fallback if isinstance(fallback, int) and fallback in rows else None


def load_file_weights(model: nn.Module, tensors: dict, what: str) -> str | None:
    """Load a file's weights into the model, the key prefix stripped to fit (returned)."""
    tensors, prefix = _fitted(model, tensors)
    load_weights(model, tensors, what=what)
    return prefix


def _fitted(model: nn.Module, tensors: dict) -> tuple[dict, str | None]:
    """The tensors under the prefix where the model's keys all are, and that prefix: a
    Lightning module saves its network under the attribute it was stored as (``model.``,
    ``net.backbone.``), beside other modules (a loss, a teacher); keys left over under
    that prefix are then named as unexpected."""
    expected = set(model.state_dict())
    if not expected <= set(tensors):
        prefixes = {".".join(k.split(".")[:depth]) + "." for k in tensors
                    for depth in (1, 2) if k.count(".") >= depth}
        for candidate in sorted(prefixes, key=len):
            inner = {k[len(candidate):]: v for k, v in tensors.items() if k.startswith(candidate)}
            if expected <= set(inner):
                return inner, candidate
    return tensors, None


# --- loading into a model ------------------------------------------------------------

def load_weights(model: nn.Module, state_dict: dict, *, what: str = "the checkpoint",
                 allow_missing_gates: bool = True) -> None:
    """Load ``state_dict`` into ``model``, naming the first mismatches when it does not
    fit. Missing gate keys are expected by default (an original checkpoint loaded into a
    gated model): the gates keep their identity initialisation."""
    freeze_norms_saved_frozen(model, state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict  # torch fills a missing count of
               and not k.endswith("num_batches_tracked")  # BN batches (files before torch 0.4.1)
               and not (allow_missing_gates and is_gate_parameter(k))]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch(model, state_dict, missing, unexpected, shapes, what))
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # e.g. a dtype torch cannot copy into the parameter
        raise CheckpointError(f"{what} does not fit the model: {first_line(e)[:200]}") from None


def freeze_norms_saved_frozen(model: nn.Module, state_dict: dict) -> None:
    """A torchvision detector's BatchNorm saved without ``num_batches_tracked`` was trained
    as ``FrozenBatchNorm2d`` (torchvision's choice for a backbone that starts pretrained;
    built offline it gets ``BatchNorm2d``): it is frozen again (timm's
    ``freeze_batch_norm_2d``), so the file loads strictly and no stage moves it. Other
    models keep their BatchNorm (torchvision's early classification files have no
    ``num_batches_tracked`` either: torch fills it)."""
    from timm.layers import freeze_batch_norm_2d

    if not type(model).__module__.startswith("torchvision.models.detection"):
        return
    for name, norm in list(model.named_modules()):
        if (type(norm) is nn.BatchNorm2d and f"{name}.running_mean" in state_dict
                and f"{name}.num_batches_tracked" not in state_dict):
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).add_module(child, freeze_batch_norm_2d(norm))


def _mismatch(model: nn.Module, state_dict: dict, missing: list, unexpected: list, shapes: list,
              what: str) -> str:
    """One line naming what does not fit and what to do about it. The diagnoses, most
    specific first: a classifier of another size (--num-classes), the first conv's
    input channels (--in-chans), gate tensors the model has no gates for, another
    architecture altogether, then the plain lists of keys and shapes."""
    expected = model.state_dict()
    hint = _size_hint(model, shapes) if shapes and not missing and not unexpected else None
    if hint:
        return f"{what}: {hint}"
    if unexpected and not missing and not shapes and all(map(is_gate_parameter, unexpected)):
        return (f"{what} holds {len(unexpected)} gate tensors ({_keys(unexpected)}) the model "
                "has no gates for: open it as the gct-surgery checkpoint it came from, or "
                "inject the same gates first")
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_keys(missing, expected)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_keys(unexpected, state_dict)})")
    if shapes:
        firsts = [f"{k}: file {list(got)}, model {list(want)}" for k, got, want in shapes[:3]]
        more = "; ..." if len(shapes) > 3 else ""
        parts.append(f"{len(shapes)} shape mismatches ({'; '.join(firsts)}{more})")
    counted = [k for k in expected if not k.endswith("num_batches_tracked")]  # never missing
    fitting = len(counted) - len(missing) - len(shapes)
    if fitting < 0.8 * len(counted) and (missing or unexpected):
        return (f"{what} looks like weights for another architecture: only {fitting} of the "
                f"model's {len(counted)} tensors match by name and shape ({'; '.join(parts)}). "
                "Pass the --arch it was trained with (timm and torchvision name the same "
                "model's keys differently for most families)")
    return (f"{what} does not fit the model: {'; '.join(parts)}. "
            "Check --arch (and --num-classes / --in-chans) against how it was trained")


def _keys(keys: list, shapes: dict | None = None, n: int = 3) -> str:
    shown = [f"{k} {list(shapes[k].shape)}" if shapes and k in shapes else k for k in keys[:n]]
    return ", ".join(shown) + (", ..." if len(keys) > n else "")


def _size_hint(model: nn.Module, shapes: list) -> str | None:
    """Shapes that differ only in the classifier's rows (--num-classes) or only in the
    first conv's input channels (--in-chans): say which option."""
    head = classifier_name(model)
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)),
                 None)
    k, got, want = shapes[0]
    if len(shapes) <= 2 and head and all(name.startswith(head + ".") for name, _, _ in shapes):
        return (f"the checkpoint's classifier has {got[0]} classes and the model's {want[0]} "
                f"({k}: file {list(got)}, model {list(want)}); pass --num-classes {got[0]}")
    if (len(shapes) == 1 and k == f"{first}.weight" and len(got) == len(want) >= 3
            and (got[0], *got[2:]) == (want[0], *want[2:])):
        return (f"the checkpoint's first conv takes {got[1]} input channels and the model's "
                f"{want[1]} ({k}: file {list(got)}, model {list(want)}); pass --in-chans {got[1]}")
    return None


# --- non-finite weights ----------------------------------------------------------------

def unshared(tensors: dict) -> dict:
    """A contiguous CPU copy of each tensor: safetensors' ``save_file`` refuses tensors
    that share storage (tied weights), and a copy per name keeps every name."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in tensors.items()}


def first_nonfinite(tensors) -> tuple[str, str] | None:
    """``(name, what)`` of the first of a model's tensors, or of ``(name, tensor)`` pairs,
    holding a NaN or inf: ``what`` says which and how many, e.g. ``"12 NaN of 4,608 values"``."""
    if isinstance(tensors, nn.Module):
        tensors = itertools.chain(tensors.named_parameters(), tensors.named_buffers())
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            parts = [f"{nan:,} NaN" if nan else "", f"{inf:,} inf" if inf else ""]
            return name, f"{' and '.join(p for p in parts if p)} of {t.numel():,} values"
    return None


def refuse_nonfinite(tensors, source: str | os.PathLike, action: str) -> None:
    """Refuse weights (a model, or ``(name, tensor)`` pairs) holding NaN or inf, naming
    the file and the first such tensor: the fault is the file's, not the export's (or
    the learning rate's)."""
    found = first_nonfinite(tensors)
    if found is not None:
        raise CheckpointError(
            f"{source} holds non-finite weights (first: {found[0]}, {found[1]}), so it cannot be "
            f"{action}; use an earlier checkpoint, e.g. a run folder's best.safetensors or one "
            "saved before the weights diverged")
