"""Model sources: every way a user has a model, behind one ``SOURCE`` string.

=============================  ==============================================
``timm:NAME``                  ``timm.create_model``; a local weights file goes
                               through ``pretrained_cfg_overlay=dict(file=...)``
``torchvision:NAME``           ``torchvision.models.get_model``, plus a local
                               weights file
``path/to/file.py:factory``    a user's own ``nn.Module`` factory
``package.module:factory``     the same, from an importable module
``pickle:PATH``                a whole pickled module, only with ``allow_pickle``
=============================  ==============================================

A checkpoint file that holds a plain state dict is a *weights* file for one of the
architectures above (``--arch``). ``parse_source`` only decides what kind of source a
string names; ``build_model`` builds it; ``load_weights`` loads a state dict with
messages that name the first mismatching keys and shapes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError, SourceError

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


@dataclass(frozen=True)
class ModelSource:
    """How to build a base model; stored in checkpoints so loading can rebuild it.

    ``kwargs`` go to the builder (``num_classes``, ``in_chans``...). ``weights`` is a
    local file loaded after building; with ``pretrained`` on a timm model it goes
    through timm's own pretrained loader (which adapts the head and input channels).
    """

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = False

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSource":
        if not isinstance(d, dict) or not isinstance(d.get("spec"), str):
            raise CheckpointError("checkpoint metadata has no valid 'source.spec'")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise CheckpointError("checkpoint metadata 'source.kwargs' is not a mapping")
        return cls(spec=d["spec"], kwargs=kwargs)

    @property
    def kind(self) -> str:
        return parse_source(self.spec)[0]


def parse_source(text: str) -> tuple[str, str]:
    """Split a SOURCE string into ``(kind, location)``. Kinds: timm, torchvision,
    factory, pickle, file (a checkpoint or state-dict file)."""
    for prefix in ("timm", "torchvision", "pickle"):
        if text.startswith(prefix + ":"):
            location = text[len(prefix) + 1:]
            if not location:
                raise SourceError(f"{text!r} names no model; write e.g. {prefix}:resnet18")
            return prefix, location
    left, sep, right = text.rpartition(":")
    if sep and re.fullmatch(_IDENT, right) and (
        left.endswith(".py") or re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", left)
    ):
        return "factory", text
    return "file", text


def build_model(source: ModelSource, *, allow_pickle: bool = False) -> nn.Module:
    """Build the base model a source names, with its weights if it has any."""
    kind, location = parse_source(source.spec)
    if kind == "timm":
        model = _build_timm(location, source)
    elif kind == "torchvision":
        model = _build_torchvision(location, source)
    elif kind == "factory":
        model = _build_factory(location, source.kwargs)
    elif kind == "pickle":
        model = _load_pickled_module(location, allow_pickle)
    else:
        raise SourceError(
            f"{source.spec!r} is a file, not an architecture: give --arch timm:NAME, "
            "torchvision:NAME or path/to/file.py:factory")
    if source.weights and not (kind == "timm" and source.pretrained):
        load_weights(model, load_state_dict_file(source.weights, allow_pickle=allow_pickle),
                     what=source.weights)
    return model


def _build_timm(name: str, source: ModelSource) -> nn.Module:
    import timm

    kwargs = dict(source.kwargs)
    pretrained = source.pretrained
    if pretrained and source.weights:
        _require_file(source.weights)
        kwargs["pretrained_cfg_overlay"] = dict(file=str(source.weights))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{name}*")[:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise SourceError(f"unknown timm model {name!r}{hint}") from None
        raise
    except (OSError, ValueError) as e:
        if pretrained and not source.weights:
            raise SourceError(
                f"could not fetch pretrained weights for timm:{name} "
                f"({type(e).__name__}); offline, pass a local file with --weights PATH") from None
        if pretrained:
            raise SourceError(f"could not load weights {source.weights}: {_first_line(e)}") from None
        raise
    except TypeError as e:
        raise SourceError(f"timm:{name} does not take these arguments: {_first_line(e)}") from None


def _build_torchvision(name: str, source: ModelSource) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, **source.kwargs)
    except ValueError as e:
        if "Unknown model" in str(e):
            names = torchvision.models.list_models()
            close = [n for n in names if name.lower() in n or n in name.lower()][:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise SourceError(f"unknown torchvision model {name!r}{hint}") from None
        raise SourceError(f"torchvision:{name}: {_first_line(e)}") from None
    except TypeError as e:
        raise SourceError(f"torchvision:{name} does not take these arguments: {_first_line(e)}") from None


def _build_factory(location: str, kwargs: dict) -> nn.Module:
    module_ref, _, attr = location.rpartition(":")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        _require_file(path)
        mod_name = f"gct_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise SourceError(f"{path} failed to import: {type(e).__name__}: {_first_line(e)}") from None
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as e:
            raise SourceError(f"cannot import {module_ref!r}: {_first_line(e)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SourceError(f"{module_ref} has no callable {attr!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise SourceError(f"{location} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_pickled_module(path: str, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        raise SourceError(
            f"{path} would be unpickled as a whole module, which runs code from the file; "
            "pass --allow-pickle only if you trust it")
    import torch

    _require_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _require_file(path: str | os.PathLike) -> None:
    p = Path(path)
    if not p.exists():
        raise SourceError(f"no such file: {p}")
    if not p.is_file():
        raise SourceError(f"not a file: {p}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- state dicts -----------------------------------------------------------------

def load_state_dict_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """Read a state dict from a .safetensors or torch file, unwrapping the usual
    containers (``state_dict``, ``model``) and a DDP ``module.`` prefix.

    torch files load with ``weights_only=True`` unless ``allow_pickle``: a pickle can
    run code, and a downloaded checkpoint is untrusted data.
    """
    import torch

    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from .checkpoint import read_tensors

        return read_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=False)
    except pickle.UnpicklingError as e:
        if not allow_pickle and "weights_only" in str(e):
            raise CheckpointError(
                f"{path} holds objects that only a full unpickle can build, and unpickling "
                "runs code from the file; refused. Pass --allow-pickle only if you trust it") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {_first_line(e)}") from None
    except Exception as e:  # torch raises many types on corrupt zips/pickles
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{_first_line(e)[:200]})") from None
    return unwrap_state_dict(obj, path)


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def unwrap_state_dict(obj: Any, path: str | os.PathLike = "checkpoint") -> dict:
    import torch

    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(3):  # {'state_dict': {'model': {...}}} happens
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors or not all(isinstance(k, str) for k in tensors):
        raise CheckpointError(f"{path} does not hold a state dict of named tensors")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_weights(model: nn.Module, state_dict: dict, *, what: str = "the checkpoint",
                 allow_missing_gates: bool = True) -> None:
    """Load ``state_dict`` into ``model``, naming the first mismatches when it does not fit.

    Missing gate keys are expected (an original checkpoint loaded into a gated model):
    the gates keep their identity initialisation.
    """
    from .surgery import is_gate_parameter

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict
               and not (allow_missing_gates and is_gate_parameter(k))]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(describe_mismatch(model, missing, unexpected, shapes, what))
    model.load_state_dict(state_dict, strict=False)


def describe_mismatch(model: nn.Module, missing: list, unexpected: list, shapes: list,
                      what: str) -> str:
    head_hint = _class_count_hint(model, shapes)
    if head_hint:
        return f"{what}: {head_hint}"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches ({k}: file {list(got)}, model {list(want)})")
    return (f"{what} does not fit the model: {'; '.join(parts)}. "
            "Check --arch (and --num-classes / --in-chans) against how it was trained")


def _class_count_hint(model: nn.Module, shapes: list) -> str | None:
    """A mismatch only in the classifier is a class-count mismatch: say so."""
    if not shapes or len(shapes) > 2:
        return None
    head = _classifier_prefix(model)
    if head and all(k.startswith(head + ".") for k, _, _ in shapes):
        k, got, want = shapes[0]
        return (f"the checkpoint's classifier has {got[0]} classes and the model's {want[0]} "
                f"({k}); pass --num-classes {got[0]}")
    return None


def _classifier_prefix(model: nn.Module) -> str | None:
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:
            head = None
        for name, m in model.named_modules():
            if m is head:
                return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
