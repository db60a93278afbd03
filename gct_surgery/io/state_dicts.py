"""State dicts: reading one from a file, and loading one into a model with messages
that name the first mismatching keys and shapes and say what to do."""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..core.heads import classifier_name
from ..core.surgery import is_gate_parameter
from ..errors import CheckpointError, SourceError, first_line
from .safetensors_file import is_safetensors, read_tensors

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


def require_file(path: str | os.PathLike) -> None:
    """A file the user named must exist and be a file."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"no such file: {p}")
    if not p.is_file():
        raise SourceError(f"not a file: {p}")


def load_state_dict_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """Read a state dict from a .safetensors or torch file, unwrapping the usual
    containers (``state_dict``, ``model``) and the DDP and torch.compile prefixes.
    Other trainers' files (an EMA to choose, a Lightning prefix) are ``foreign``'s.

    torch files load with ``weights_only=True`` unless ``allow_pickle``: a pickle can
    run code, and a downloaded checkpoint is untrusted data. The file's bytes decide
    how it is read, not its extension.
    """
    path = Path(path)
    require_file(path)
    if is_safetensors(path):
        return read_tensors(path)
    return unwrap_state_dict(read_torch_file(path, allow_pickle=allow_pickle), path)


def read_torch_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """What a torch file holds, read with ``weights_only=True`` unless ``allow_pickle``.

    ``argparse.Namespace`` is allowed, as timm's own loader allows it: timm's
    ``train.py`` pickles its ``args`` into every checkpoint, and a Namespace only holds
    attributes. Any other class still needs ``allow_pickle``.
    """
    import argparse

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise around one clear line
            warnings.simplefilter("ignore")
            with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
                # a file object: torch would go by a .safetensors name
                return torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if not allow_pickle and "weights_only" in str(e):
            raise CheckpointError(
                f"{path} holds objects that only a full unpickle can build, and unpickling "
                "runs code from the file; refused. Pass --allow-pickle only if you trust it") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {first_line(e)[:200]}") from None
    except Exception as e:  # torch raises many types on corrupt zips/pickles
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{first_line(e)[:200]})") from None


def unwrap_state_dict(obj: Any, path: str | os.PathLike = "checkpoint") -> dict:
    """The ``{name: tensor}`` inside what a torch file held, or a clear error."""
    import torch

    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(4):  # {'state_dict': {'model': {...}}} happens
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
            if inner is None:
                break
            obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (it holds a {type(obj).__name__}); "
                              "save one with torch.save(model.state_dict(), PATH)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise CheckpointError(f"{path} does not hold a state dict of named tensors (top-level keys: "
                              f"{keys:.200}); save one with torch.save(model.state_dict(), PATH)")
    return strip_wrapper_prefixes(tensors)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def strip_wrapper_prefixes(tensors: dict) -> dict:
    """Keys saved through DDP (``module.``) or torch.compile (``_orig_mod.``), wrapped
    in either order, as the bare model names them."""
    while tensors:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            break
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_weights(model: nn.Module, state_dict: dict, *, what: str = "the checkpoint",
                 allow_missing_gates: bool = True) -> None:
    """Load ``state_dict`` into ``model``, naming the first mismatches when it does not fit.

    Missing gate keys are expected (an original checkpoint loaded into a gated model):
    the gates keep their identity initialisation.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict
               and not (allow_missing_gates and is_gate_parameter(k))]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(describe_mismatch(model, missing, unexpected, shapes, what,
                                                state_dict=state_dict))
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # e.g. a dtype torch cannot copy into the parameter
        raise CheckpointError(f"{what} does not fit the model: {first_line(e)[:200]}") from None


def describe_mismatch(model: nn.Module, missing: list, unexpected: list, shapes: list,
                      what: str, state_dict: dict | None = None) -> str:
    """One line naming what does not fit and what to do about it.

    The diagnoses, most specific first: a classifier of another size (--num-classes),
    gate tensors on one side only, keys under an extra prefix, another architecture
    altogether (few keys in common), then the plain lists of keys and shapes.
    """
    expected = model.state_dict()
    file_shape = (lambda k: list(state_dict[k].shape)) if state_dict is not None else (lambda k: None)
    if not missing and not unexpected:
        hint = _class_count_hint(model, shapes) or _in_chans_hint(model, shapes)
        if hint:
            return f"{what}: {hint}"
    if unexpected and not missing and not shapes and all(is_gate_parameter(k) for k in unexpected):
        return (f"{what} holds {len(unexpected)} gate tensors ({_keys(unexpected)}) the model "
                "has no gates for: open it as the gct-surgery checkpoint it came from, or "
                "inject the same gates first")
    if missing and not unexpected and not shapes and all(is_gate_parameter(k) for k in missing):
        return (f"{what} lacks {len(missing)} gate tensors ({_keys(missing)}): it was saved "
                "without gates, or from another injection; re-run inject on the base instead")
    prefix = _prefix_hint(unexpected, missing)
    if prefix:
        return f"{what}: {prefix}"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_keys(missing, lambda k: list(expected[k].shape))})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_keys(unexpected, file_shape)})")
    if shapes:
        firsts = "; ".join(f"{k}: file {list(got)}, model {list(want)}" for k, got, want in shapes[:3])
        parts.append(f"{len(shapes)} shape mismatches ({firsts}{'; ...' if len(shapes) > 3 else ''})")
    n_model = len(expected)
    fitting = n_model - len(missing) - len(shapes)
    if state_dict is not None and n_model and fitting < 0.8 * n_model and (missing or unexpected):
        return (f"{what} looks like weights for another architecture: only {fitting} of the "
                f"model's {n_model} tensors match by name and shape ({'; '.join(parts)}). "
                "Pass the --arch it was trained with (timm and torchvision name the same "
                "model's keys differently for most families)")
    return (f"{what} does not fit the model: {'; '.join(parts)}. "
            "Check --arch (and --num-classes / --in-chans) against how it was trained")


def _keys(keys: list, shape=None, n: int = 3) -> str:
    shown = [f"{k} {shape(k)}" if shape and shape(k) is not None else k for k in keys[:n]]
    return ", ".join(shown) + (", ..." if len(keys) > n else "")


def _prefix_hint(unexpected: list, missing: list) -> str | None:
    """Keys that only differ by a leading ``something.``: say which prefix to strip or add."""
    if not unexpected or not missing or len(unexpected) < len(missing):
        return None
    firsts = {k.split(".", 1)[0] for k in unexpected if "." in k}
    for prefix in sorted(firsts):
        stripped = {k[len(prefix) + 1:] for k in unexpected if k.startswith(prefix + ".")}
        if all(m in stripped for m in missing):
            return (f"its keys carry an extra '{prefix}.' prefix ({unexpected[0]} is the "
                    f"model's {unexpected[0][len(prefix) + 1:]}); save the inner module's "
                    f"state_dict, or strip '{prefix}.' from the keys")
    return None


def _class_count_hint(model: nn.Module, shapes: list) -> str | None:
    """A mismatch only in the classifier is a class-count mismatch: say so."""
    if not shapes or len(shapes) > 2:
        return None
    head = classifier_name(model)
    if head and all(k.startswith(head + ".") for k, _, _ in shapes):
        k, got, want = shapes[0]
        return (f"the checkpoint's classifier has {got[0]} classes and the model's {want[0]} "
                f"({k}: file {list(got)}, model {list(want)}); pass --num-classes {got[0]}")
    return None


def _in_chans_hint(model: nn.Module, shapes: list) -> str | None:
    """A mismatch only in the first conv's input channels: say --in-chans."""
    if len(shapes) != 1:
        return None
    k, got, want = shapes[0]
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if (first is not None and k == f"{first}.weight" and len(got) == len(want) >= 3
            and got[0] == want[0] and got[2:] == want[2:] and got[1] != want[1]):
        return (f"the checkpoint's first conv takes {got[1]} input channels and the model's "
                f"{want[1]} ({k}: file {list(got)}, model {list(want)}); pass --in-chans {got[1]}")
    return None
