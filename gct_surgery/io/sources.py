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

import functools
import importlib
import importlib.util
import os
import pickle
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, SourceError, UserError

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
        check_recorded_source(d)
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
    builders = {"timm": lambda: _build_timm(location, source),
                "torchvision": lambda: _build_torchvision(location, source),
                "factory": lambda: _build_factory(location, source.kwargs)}
    if kind in builders:
        _check_size_on_meta(builders[kind], source)
        model = builders[kind]()
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


MAX_MODEL_ELEMENTS = 2**30  # 4 GiB of float32: far beyond any CNN this tool gates
_LARGE_KWARG = 4096


def _check_size_on_meta(build, source: ModelSource) -> None:
    """With a large size among the kwargs (``width=50000`` in a file's metadata), build
    on the meta device first and refuse a model too big to allocate."""
    values = [v for x in source.kwargs.values() for v in (x if isinstance(x, list) else [x])]
    if not any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > _LARGE_KWARG for v in values):
        return
    import torch

    try:
        with torch.device("meta"):
            probe = build()
    except UserError:
        raise
    except Exception:
        return  # the real build reports the problem
    n = sum(t.numel() for t in [*probe.parameters(), *probe.buffers()])
    if n > MAX_MODEL_ELEMENTS:
        raise SourceError(f"{source.spec} with {_kwargs_text(source.kwargs)} would have {n:,} "
                          f"parameters (more than {MAX_MODEL_ELEMENTS:,}); refused")


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
    except Exception as e:  # e.g. num_classes=-1: torch refuses the layer shapes
        raise SourceError(f"timm:{name} could not be built with {kwargs or 'no arguments'}: "
                          f"{type(e).__name__}: {_first_line(e)[:200]}") from None


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
    except Exception as e:
        raise SourceError(f"torchvision:{name} could not be built with {source.kwargs or 'no arguments'}: "
                          f"{type(e).__name__}: {_first_line(e)[:200]}") from None


def import_object(location: str, what: str = "SOURCE", error: type = SourceError):
    """The object that ``path/to/file.py:name`` or ``package.module:name`` names.

    Shared by factory sources and ``--task``; ``error`` is the UserError kind to raise.
    """
    module_ref, _, attr = location.rpartition(":")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise error(f"{what}: no such file: {path}")
        mod_name = f"gct_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise error(f"{what}: {path} failed to import: {type(e).__name__}: {_first_line(e)}") from None
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as e:
            raise error(f"{what}: cannot import {module_ref!r}: {_first_line(e)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise error(f"{what}: {module_ref} has no {attr!r}")
    return obj


def _build_factory(location: str, kwargs: dict) -> nn.Module:
    factory = import_object(location)
    if not callable(factory):
        raise SourceError(f"{location} is not callable")
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's code, called with the user's (or a file's) kwargs
        raise SourceError(f"{location}({_kwargs_text(kwargs)}) failed: "
                          f"{type(e).__name__}: {_first_line(e)[:200]}") from None
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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt, or pickled against classes this environment lacks
        raise SourceError(f"{path} could not be unpickled ({type(e).__name__}: "
                          f"{_first_line(e)[:200]})") from None
    if not isinstance(obj, nn.Module):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return obj


# --- sources recorded in checkpoints ------------------------------------------------

# Builder arguments that make timm or torchvision read files or the network: a file
# never gets to choose those.
_LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                            "checkpoint_path", "cache_dir", "weights", "weights_backbone"})
# Packages whose functions a hostile file could name as a "factory" to run commands
# or write files (besides the standard library and installed packages, refused by location).
_NEVER_FACTORIES = frozenset({"gct_surgery", "torch", "torchvision", "timm", "numpy",
                              "safetensors", "typer", "rich", "pip", "setuptools"})
MAX_KWARG_INT = 2**20


def check_recorded_source(source: Any, what: str = "checkpoint") -> None:
    """Refuse a source recorded in a checkpoint that would run code the user did not write.

    A checkpoint is untrusted data, yet its ``source`` names code that loading runs:
    ``os:system`` with ``{"command": ...}`` would be a remote code execution through a
    .safetensors file. So a recorded factory must live outside the Python installation
    (the user's own ``file.py`` or package), and kwargs are plain values that cannot
    point a builder at files. ``pickle:`` sources stay behind ``allow_pickle``.
    """
    if not isinstance(source, dict) or not isinstance(source.get("spec"), str) or not source["spec"]:
        raise CheckpointError(f"{what}: metadata 'source.spec' should be a non-empty string")
    spec = source["spec"]
    if len(spec) > 4096:
        raise CheckpointError(f"{what}: metadata 'source.spec' is too long")
    try:
        kind, location = parse_source(spec)
    except SourceError as e:
        raise CheckpointError(f"{what}: metadata source is invalid: {e}") from None
    if kind == "file":
        raise CheckpointError(f"{what}: metadata source {spec!r} names no architecture")
    if kind == "factory":
        _check_factory_origin(location, what)
    kwargs = source.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{what}: metadata 'source.kwargs' should be an object")
    for key, value in kwargs.items():
        if not re.fullmatch(_IDENT, key) or key in _LOADER_KWARGS:
            raise CheckpointError(f"{what}: metadata source argument {key!r} is not allowed "
                                  "(a checkpoint may not name files or downloads to load)")
        if not _plain_kwarg(value):
            raise CheckpointError(f"{what}: metadata source argument {key}={value!r:.60} is not "
                                  f"a plain value (bool, int within ±{MAX_KWARG_INT}, finite "
                                  "float, short string, or a short list of these)")


def _plain_kwarg(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 256
    if isinstance(value, list) and depth == 0:
        return len(value) <= 64 and all(_plain_kwarg(v, 1) for v in value)
    return False


def _check_factory_origin(location: str, what: str) -> None:
    module_ref, _, attr = location.rpartition(":")
    refusal = (f"{what}: metadata names the factory {location!r} in {{where}}; a checkpoint "
               "may only name your own model code (a file.py:factory or package outside the "
               "Python installation), since loading calls it")
    if attr.startswith("_"):
        raise CheckpointError(refusal.format(where="a private name"))
    if module_ref.endswith(".py"):
        try:
            resolved = Path(module_ref).resolve()
        except (OSError, RuntimeError, ValueError):
            raise CheckpointError(f"{what}: metadata factory path {module_ref!r} is invalid") from None
        if any(_inside(resolved, d) for d in _installation_dirs()):
            raise CheckpointError(refusal.format(where="the Python installation"))
        return
    top = module_ref.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise CheckpointError(refusal.format(where="the standard library"))
    if top in _NEVER_FACTORIES:
        raise CheckpointError(refusal.format(where=f"the {top} package"))
    try:
        found = importlib.util.find_spec(top)  # a top-level name: located, not imported
    except (ImportError, ValueError):
        found = None
    places = [found.origin] if found is not None and found.origin else []
    if found is not None and found.submodule_search_locations:
        places += list(found.submodule_search_locations)
    for place in places:
        if place and any(_inside(Path(place).resolve(), d) for d in _installation_dirs()):
            raise CheckpointError(refusal.format(where="an installed package"))


@functools.lru_cache(maxsize=1)
def _installation_dirs() -> tuple[Path, ...]:
    """The standard library and site-packages folders of this interpreter."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    dirs = [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some embedded interpreters lack these
        pass
    return tuple(Path(d).resolve() for d in dirs if d)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _require_file(path: str | os.PathLike) -> None:
    p = Path(path)
    if not p.exists():
        raise SourceError(f"no such file: {p}")
    if not p.is_file():
        raise SourceError(f"not a file: {p}")


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- state dicts -----------------------------------------------------------------

def load_state_dict_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """Read a state dict from a .safetensors or torch file, unwrapping the usual
    containers (``state_dict``, ``model``) and a DDP ``module.`` prefix.

    torch files load with ``weights_only=True`` unless ``allow_pickle``: a pickle can
    run code, and a downloaded checkpoint is untrusted data. The file's bytes decide
    how it is read, not its extension.
    """
    import torch

    path = Path(path)
    _require_file(path)
    head = _head(path)
    is_torch = head[:4] == _ZIP_MAGIC or head[:1] == b"\x80"  # torch zip, or a (legacy) pickle
    if _looks_like_safetensors(head) or (path.suffix == ".safetensors" and not is_torch):
        from .checkpoint import read_tensors

        return read_tensors(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise around one clear line
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # a file object: torch would go by a .safetensors name
                obj = torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if not allow_pickle and "weights_only" in str(e):
            raise CheckpointError(
                f"{path} holds objects that only a full unpickle can build, and unpickling "
                "runs code from the file; refused. Pass --allow-pickle only if you trust it") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {_first_line(e)[:200]}") from None
    except Exception as e:  # torch raises many types on corrupt zips/pickles
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{_first_line(e)[:200]})") from None
    return unwrap_state_dict(obj, path)


_ZIP_MAGIC = b"PK\x03\x04"


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) == 9 and head[8:9] == b"{"


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
    from ..core.surgery import is_gate_parameter

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
        raise CheckpointError(f"{what} does not fit the model: {_first_line(e)[:200]}") from None


def describe_mismatch(model: nn.Module, missing: list, unexpected: list, shapes: list,
                      what: str, state_dict: dict | None = None) -> str:
    """One line naming what does not fit and what to do about it.

    The diagnoses, most specific first: a classifier of another size (--num-classes),
    gate tensors on one side only, keys under an extra prefix, another architecture
    altogether (few keys in common), then the plain lists of keys and shapes.
    """
    from ..core.surgery import is_gate_parameter

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
    head = _classifier_prefix(model)
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
