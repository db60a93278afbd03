"""Model sources: every way a user has a model, behind one ``SOURCE`` string.

=============================  ==============================================
``timm:NAME``                  ``timm.create_model``; a local weights file goes
                               through ``pretrained_cfg_overlay=dict(file=...)``
``timm:hf-hub:ID``,            timm's own sources, resolved once (``resolve_timm_hub``)
``timm:local-dir:PATH``        to the architecture and config they hold
``torchvision:NAME``           ``torchvision.models.get_model``, plus a local
                               weights file
``path/to/file.py:factory``    a user's own ``nn.Module`` factory
``package.module:factory``     the same, from an importable module
``pickle:PATH``                a whole pickled module, only with ``allow_pickle``
=============================  ==============================================

User code imports as a script would: a ``file.py`` source (and a ``--task`` file)
runs with its own folder on the import path, so ``from blocks import ...`` finds the
module beside it; a ``package.module`` resolves from the current folder (the
checkpoint records that folder as the source's ``root``, so loading works from
anywhere else).

A checkpoint file that holds a plain state dict is a *weights* file for one of the
architectures above (``--arch``); other trainers' files are read by ``foreign``. ``parse_source`` only decides what kind of source a
string names; ``build_model`` builds it. Which sources a checkpoint may record is
``source_rules``; reading and loading state dicts is ``state_dicts``.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import CheckpointError, SourceError, UserError, first_line
from .foreign import load_file_weights, read_weights_file
from .state_dicts import require_file

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"


@dataclass(frozen=True)
class ModelSource:
    """How to build a base model; stored in checkpoints so loading can rebuild it.

    ``kwargs`` go to the builder (``num_classes``, ``in_chans``...). ``weights`` is a
    local file loaded after building; with ``pretrained`` on a timm model it goes
    through timm's own pretrained loader (which adapts the head and input channels).
    ``use_ema`` takes a trainer's EMA weights from ``weights``; ``pretrained_cfg`` is
    the config a ``timm:hf-hub:``/``local-dir:`` source held (never recorded: the
    checkpoint records the architecture it resolved to).
    """

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = False
    root: str | None = None  # package.module:factory: the folder the package was found in
    use_ema: bool = False
    pretrained_cfg: dict | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        d = {"spec": self.spec, "kwargs": dict(self.kwargs)}
        if self.root:
            d["root"] = self.root
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSource":
        """A source as recorded in a checkpoint; ``source_rules.check_recorded_source``
        decides first whether it may be built."""
        if not isinstance(d, dict) or not isinstance(d.get("spec"), str):
            raise CheckpointError("checkpoint metadata has no valid 'source.spec'")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise CheckpointError("checkpoint metadata 'source.kwargs' is not a mapping")
        root = d.get("root")
        if root is not None and not isinstance(root, str):
            raise CheckpointError("checkpoint metadata 'source.root' is not a folder path")
        return cls(spec=d["spec"], kwargs=kwargs, root=root)

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
    if sep and re.fullmatch(IDENTIFIER, right) and (
        left.endswith(".py") or re.fullmatch(rf"{IDENTIFIER}(\.{IDENTIFIER})*", left)
    ):
        return "factory", text
    return "file", text


def build_model(source: ModelSource, *, allow_pickle: bool = False) -> nn.Module:
    """Build the base model a source names, with its weights if it has any."""
    kind, location = parse_source(source.spec)
    builders = {"timm": lambda: _build_timm(location, source),
                "torchvision": lambda: _build_torchvision(location, source),
                "factory": lambda: _build_factory(location, source.kwargs, source.root)}
    if kind in builders:
        _check_size_on_meta(builders[kind], source)
        model = builders[kind]()
    elif kind == "pickle":
        model = _load_pickled_module(location, allow_pickle)
    else:
        raise not_an_architecture(source.spec)
    if source.weights and not (kind == "timm" and source.pretrained):
        weights = read_weights_file(source.weights, use_ema=source.use_ema, allow_pickle=allow_pickle)
        load_file_weights(model, weights.tensors, what=source.weights)
    return model


def not_an_architecture(text: str) -> SourceError:
    """``--arch`` given a file or a bare name: the architecture it probably meant."""
    if Path(text).is_file():
        return SourceError(f"{text!r} is a file, not an architecture: give --arch timm:NAME, "
                           "torchvision:NAME or path/to/file.py:factory")
    meant = meant_architecture(text)
    if meant:
        return SourceError(f"{text!r} is not a file; did you mean --arch {meant}?")
    close = close_timm_names(text)
    hint = f" (close timm names: {', '.join(close)})" if close else ""
    return SourceError(f"{text!r} is neither a file nor an architecture{hint}; give --arch "
                       "timm:NAME, torchvision:NAME or path/to/file.py:factory")


def meant_architecture(text: str) -> str | None:
    """``timm:NAME`` or ``torchvision:NAME`` for a bare model name (``resnet18``), else None."""
    import timm

    if timm.is_model(text.split(".")[0]):
        return f"timm:{text}"
    import torchvision

    return f"torchvision:{text}" if text in torchvision.models.list_models() else None


def close_timm_names(name: str, n: int = 5) -> list[str]:
    """timm model names near a misspelt one: by spelling, then by containing it."""
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.75)
    return (close + [m for m in timm.list_models(f"*{name}*") if m not in close])[:n]


HUB_SOURCES = ("hf-hub:", "local-dir:")


def resolve_timm_hub(source: ModelSource) -> ModelSource:
    """``timm:hf-hub:ID`` and ``timm:local-dir:PATH`` as the architecture and config
    they hold (timm's ``load_model_config_from_*``), with their weights: the checkpoint
    then records ``timm:ARCH`` and never needs the folder or the network again."""
    kind, location = parse_source(source.spec)
    if kind != "timm" or not location.startswith(HUB_SOURCES):
        return source
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    hub, _, ident = location.partition(":")
    try:
        if hub == "local-dir":
            cfg, arch, model_args = load_model_config_from_path(Path(ident).resolve())
        else:
            cfg, arch, model_args = load_model_config_from_hf(ident)
    except Exception as e:  # no config.json; huggingface_hub: offline and not cached, no network
        if hub == "local-dir":
            raise SourceError(f"timm:{location}: no config.json in {Path(ident).resolve()}; a "
                              "local-dir: folder holds config.json and model.safetensors, as "
                              "timm's save_for_hf writes them") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline
               else f"could not be fetched ({type(e).__name__})")
        raise SourceError(f"timm:{location} {why}; download it once with the network on, or save "
                          "it to a folder and pass timm:local-dir:PATH") from None
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in (model_args or {}).items()}
    return replace(source, spec=f"timm:{arch}", kwargs={**kwargs, **source.kwargs},
                   pretrained=source.pretrained or not source.weights, pretrained_cfg=dict(cfg))


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
    if source.pretrained_cfg:
        kwargs["pretrained_cfg"] = source.pretrained_cfg
    if pretrained and source.weights:
        require_file(source.weights)
        kwargs["pretrained_cfg_overlay"] = dict(file=str(source.weights))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = close_timm_names(name)
            hint = f"; did you mean {' or '.join(f'timm:{c}' for c in close[:3])}?" if close else ""
            raise SourceError(f"unknown timm model {name!r}{hint}") from None
        raise
    except (OSError, ValueError) as e:
        if pretrained and not source.weights:
            raise SourceError(
                f"could not fetch pretrained weights for timm:{name} "
                f"({type(e).__name__}); offline, pass a local file with --weights PATH") from None
        if pretrained:
            raise SourceError(f"could not load weights {source.weights}: {first_line(e)}") from None
        raise
    except TypeError as e:
        raise SourceError(f"timm:{name} does not take these arguments: {first_line(e)}") from None
    except Exception as e:  # e.g. num_classes=-1: torch refuses the layer shapes
        raise SourceError(f"timm:{name} could not be built with {kwargs or 'no arguments'}: "
                          f"{type(e).__name__}: {first_line(e)[:200]}") from None


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
        raise SourceError(f"torchvision:{name}: {first_line(e)}") from None
    except TypeError as e:
        raise SourceError(f"torchvision:{name} does not take these arguments: {first_line(e)}") from None
    except Exception as e:
        raise SourceError(f"torchvision:{name} could not be built with {source.kwargs or 'no arguments'}: "
                          f"{type(e).__name__}: {first_line(e)[:200]}") from None


def import_object(location: str, what: str = "SOURCE", error: type = SourceError,
                  root: str | None = None):
    """The object that ``path/to/file.py:name`` or ``package.module:name`` names.

    Imported as a script would be: a file with its own folder first on the import path
    (its neighbours import), a package from ``root`` (recorded in a checkpoint) or else
    the current folder; the import path is restored afterwards, so no later import
    resolves from that folder. Shared by factory sources and ``--task``; ``error`` is
    the UserError kind to raise. Whether code a *file* names may run at all is
    ``trust.require``'s question, asked before this.
    """
    module_ref, _, attr = location.rpartition(":")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise error(f"{what}: no such file: {path}" + (
                "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"))
        folder = str(path.resolve().parent)
        mod_name = f"gct_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            with on_import_path(folder):
                spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            hint = (f" (looked beside it in {folder} and on the import path)"
                    if isinstance(e, ImportError) else "")
            raise error(f"{what}: {path} failed to import: {type(e).__name__}: "
                        f"{first_line(e)}{hint}") from None
    else:
        folder = root or os.getcwd()
        try:
            with on_import_path(folder):
                module = importlib.import_module(module_ref)
        except ImportError as e:
            where = (f"the checkpoint recorded it in {root}: put {module_ref.split('.')[0]} "
                     "there, or rebuild where it is importable" if root else
                     f"looked in the current folder {folder} and on the import path")
            raise error(f"{what}: cannot import {module_ref!r}: {first_line(e)} ({where})") from None
        except Exception as e:  # the user's module raised while importing
            raise error(f"{what}: {module_ref} failed to import: {type(e).__name__}: "
                        f"{first_line(e)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise error(f"{what}: {module_ref} has no {attr!r}")
    return obj


def code_folder(location: str, root: str | None = None) -> str:
    """The folder a factory's module is imported from (its neighbours import from it)."""
    module_ref = location.rpartition(":")[0]
    if module_ref.endswith(".py"):
        return str(Path(module_ref).resolve().parent)
    return root or os.getcwd()


@contextlib.contextmanager
def on_import_path(folder: str) -> Iterator[None]:
    """``folder`` first on the import path, as Python does for a script's folder, for the
    time of the block only."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _build_factory(location: str, kwargs: dict, root: str | None = None) -> nn.Module:
    factory = import_object(location, root=root)
    if not callable(factory):
        raise SourceError(f"{location} is not callable")
    try:
        with on_import_path(code_folder(location, root)):  # a factory's own lazy imports
            model = factory(**kwargs)
    except Exception as e:  # the user's code, called with the user's (or a file's) kwargs
        raise SourceError(f"{location}({_kwargs_text(kwargs)}) failed: "
                          f"{type(e).__name__}: {first_line(e)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"{location} returned {type(model).__name__}, not an nn.Module")
    return model


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def model_data_config(model: nn.Module, kind: str | None = None) -> dict:
    """What the model's source says about its input: timm's pretrained config; for a
    2-D RGB torchvision model, torchvision's ImageNet preprocessing (bilinear, crop
    0.875); for anything else only an input size guessed from the first conv. No
    mean/std is made up here: a user's model was normalised as its author chose."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        resolved = resolve_data_config({}, model=model)
        data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolved.items()}
        if first is not None and first.in_channels != data["input_size"][0]:
            data["input_size"] = [first.in_channels, *data["input_size"][1:]]  # timm keeps [3, ...]
            fit_channels(data, first.in_channels)
        return data
    channels = first.in_channels if first is not None else 3
    dims = len(first.kernel_size) if first is not None else 2
    spatial = {1: [256], 2: [224, 224], 3: [8, 112, 112]}[dims]
    data: dict[str, Any] = {"input_size": [channels, *spatial]}
    if kind == "torchvision" and dims == 2 and channels == 3:
        data.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), interpolation="bilinear",
                    crop_pct=0.875)
    return data


def _load_pickled_module(path: str, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        raise SourceError(
            f"{path} would be unpickled as a whole module, which runs code from the file; "
            "pass --allow-pickle only if you trust it")
    import torch

    require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt, or pickled against classes this environment lacks
        raise SourceError(f"{path} could not be unpickled ({type(e).__name__}: "
                          f"{first_line(e)[:200]})") from None
    if not isinstance(obj, nn.Module):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def fit_channels(cfg: dict, channels: int) -> None:
    """One mean and std value per input channel. timm's pretrained config keeps
    ImageNet's three for a model built with ``in_chans=1`` (and then asserts on them):
    a grey model gets their average, as timm's ``adapt_input_conv`` sums the RGB
    filters into one. Any other mismatch is the record's error, named."""
    for key in ("mean", "std"):
        values = cfg.get(key)
        if values is None or len(values) == channels:
            continue
        if channels == 1:
            cfg[key] = (sum(values) / len(values),)
        elif len(values) == 1:
            cfg[key] = tuple(values) * channels
        else:
            raise SourceError(f"the checkpoint records {len(values)} {key} values for {channels} input "
                            f"channels; record {channels} with `gct-surgery inject ... --{key} ...`")
