"""Model sources: every way a user has a model, behind one ``SOURCE`` string.

``timm:NAME`` (``timm.create_model``; ``timm:hf-hub:ID`` and ``timm:local-dir:PATH``
resolved once to the architecture they hold), ``torchvision:NAME``
(``torchvision.models.get_model``), each with an optional local weights file;
``path/to/file.py:factory`` and ``package.module:factory`` (a user's own ``nn.Module``
factory); ``pickle:PATH`` (a whole pickled module, only with ``allow_pickle``).

User code is found, consented to and imported by ``trust``; a ``package.module`` is
recorded with the folder it was found in (``root``), so loading works from anywhere.

A checkpoint is data: a source it *records* is held to plain names and values
(``check_recorded_source``), and code it names runs only with the user's consent
(``trust.require``). A state-dict file is a *weights* file for one of the sources
above (``--arch``); other trainers' files are read by ``state_dicts``.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from inspect import signature
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, SourceError, first_line
from .state_dicts import load_file_weights, load_weights, read_weights_file, require_file
from .trust import IDENTIFIER, code_folder, code_spec, import_object, on_import_path
_MODEL_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"  # a registered name: no hub, no folder
# Builder arguments that make timm or torchvision read files or the network:
_LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                            "checkpoint_path", "cache_dir", "weights", "weights_backbone"})
MAX_KWARG_INT = 2**20
MAX_MODEL_ELEMENTS = 2**30  # 4 GiB of float32: far beyond any CNN this tool gates
ARCH_HINT = "give --arch timm:NAME, torchvision:NAME or path/to/file.py:factory"


@dataclass(frozen=True)
class ModelSource:
    """How to build a base model; a checkpoint records ``to_dict()`` to rebuild it.
    ``weights``: a local file loaded after building (through timm's own pretrained loader
    with ``pretrained``, which adapts the head); ``use_ema``: a trainer's EMA weights from
    it; ``pretrained_cfg``: the config a timm hub source held (never recorded)."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = False
    root: str | None = None  # package.module:factory: the folder the package was found in
    use_ema: bool = False
    pretrained_cfg: dict | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kwargs": dict(self.kwargs),
                **({"root": self.root} if self.root else {})}

    @classmethod
    def from_dict(cls, d: Any, what: str = "checkpoint") -> "ModelSource":
        """A source as a checkpoint records it, held to ``check_recorded_source``."""
        check_recorded_source(d, what)
        return cls(spec=d["spec"], kwargs=dict(d.get("kwargs") or {}), root=d.get("root"))

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
    return ("factory" if code_spec(text) else "file"), text


def timm_hub(spec: str) -> tuple[str, str] | None:
    """``(hub, ident)`` for ``timm:hf-hub:ID`` or ``timm:local-dir:PATH``, else None."""
    hub, sep, ident = spec.removeprefix("timm:").partition(":")
    is_hub = spec.startswith("timm:") and sep and hub in ("hf-hub", "local-dir")
    return (hub, ident) if is_hub else None


# --- what a file may record -------------------------------------------------------------

def check_recorded_source(source: Any, what: str = "checkpoint", *, base: bool = False) -> None:
    """Refuse a recorded source that is not plain data: a model name that reaches a hub
    or a folder, kwargs that name files or downloads or are not plain values, a
    ``root`` that is not an absolute folder of a package source. A ``base`` (the
    source a model was first opened from) may be a ``timm:local-dir:/abs`` folder: a
    gates-only file rebuilds it from there, never from the network."""
    spec = source.get("spec") if isinstance(source, dict) else None
    if not isinstance(spec, str) or not 0 < len(spec) <= 4096:
        raise CheckpointError(f"{what}: metadata 'source.spec' should be a string of 1 to 4096 "
                              "characters")
    root = source.get("root")
    try:
        kind, location = parse_source(spec)
    except SourceError as e:
        raise CheckpointError(f"{what}: metadata source is invalid: {e}") from None
    if kind == "file":
        raise CheckpointError(f"{what}: metadata source {spec!r} names no architecture")
    hub = timm_hub(spec)
    folder = base and hub is not None and hub[0] == "local-dir" and hub[1].startswith("/")
    if kind in ("timm", "torchvision") and not (re.fullmatch(_MODEL_NAME, location) or folder):
        raise CheckpointError(f"{what}: metadata source {spec!r:.80} is not a plain model name "
                              "(a checkpoint may not name a hub, a folder or a download)")
    package = kind == "factory" and not location.rpartition(":")[0].endswith(".py")
    if root is not None and not (package and isinstance(root, str) and 0 < len(root) <= 4096
                                 and Path(root).is_absolute()):
        raise CheckpointError(f"{what}: metadata 'source.root' should be an absolute folder "
                              "path, and goes only with a package.module:factory source")
    check_plain_kwargs(source.get("kwargs") or {}, what)


def check_plain_kwargs(kwargs: Any, what: str) -> None:
    """Builder arguments a file chose: plain values that never name files or downloads."""
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{what}: the builder arguments should be an object")
    for key, value in kwargs.items():
        if not re.fullmatch(IDENTIFIER, key) or key in _LOADER_KWARGS:
            raise CheckpointError(f"{what}: builder argument {key!r} is not allowed "
                                  "(a file may not name files or downloads to load)")
        if not (_plain(value) or isinstance(value, list) and len(value) <= 64
                and all(map(_plain, value))):
            raise CheckpointError(f"{what}: builder argument {key}={value!r:.60} is not "
                                  f"a plain value (bool, int within ±{MAX_KWARG_INT}, finite "
                                  "float, short string, or a short list of these)")


def _plain(v: Any) -> bool:
    return (v is None or isinstance(v, bool) or isinstance(v, int) and abs(v) <= MAX_KWARG_INT
            or isinstance(v, float) and math.isfinite(v) or isinstance(v, str) and len(v) <= 256)


def recordable(source: ModelSource) -> ModelSource:
    """The source as a checkpoint records it, so that it rebuilds from any folder: a
    ``file.py`` by its absolute path (its neighbours sit beside it), a
    ``package.module`` with the folder it was imported from (call after building)."""
    if source.kind != "factory":
        return source
    module_ref, _, attr = source.spec.rpartition(":")
    if module_ref.endswith(".py"):
        return replace(source, spec=f"{Path(module_ref).resolve()}:{attr}")
    if source.root:
        return source
    module = sys.modules.get(module_ref.split(".")[0])
    where = [*(getattr(module, "__path__", None) or []), getattr(module, "__file__", None)][0]
    return replace(source, root=str(Path(where).resolve().parent) if where else None)


def resolve_hub(source: ModelSource, what: str) -> ModelSource:
    """``timm:hf-hub:ID`` and ``timm:local-dir:PATH`` as the architecture and config they
    hold (timm's ``load_model_config_from_*``), with their weights: the checkpoint then
    records ``timm:ARCH`` and never needs the folder or the network again. The builder
    arguments its config.json chose are a file's choice, held to the plain-value rule."""
    hub = timm_hub(source.spec)
    if hub is None:
        return source
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    kind, ident = hub
    try:
        if kind == "local-dir":
            cfg, arch, model_args = load_model_config_from_path(Path(ident).resolve())
        else:
            cfg, arch, model_args = load_model_config_from_hf(ident)
    except Exception as e:  # no config.json; huggingface_hub: offline and not cached, no network
        if kind == "local-dir":
            raise SourceError(f"{source.spec}: no config.json in {Path(ident).resolve()}; a "
                              "local-dir: folder holds config.json and model.safetensors, as "
                              "timm's save_for_hf writes them") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline
               else f"could not be fetched ({type(e).__name__})")
        raise SourceError(f"{source.spec} {why}; download it once with the network on, or save "
                          "it to a folder and pass timm:local-dir:PATH") from None
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in (model_args or {}).items()}
    check_plain_kwargs(kwargs, f"{what} (config.json model_args)")
    return replace(source, spec=f"timm:{arch}", kwargs={**kwargs, **source.kwargs},
                   pretrained=source.pretrained or not source.weights, pretrained_cfg=dict(cfg))


# --- building ---------------------------------------------------------------------------

def build_model(source: ModelSource, *, allow_pickle: bool = False) -> nn.Module:
    """Build the base model a source names (a hub resolved first), with its weights if
    it has any."""
    source = resolve_hub(source, source.spec)
    kind, location = parse_source(source.spec)
    builders = {"timm": _build_timm, "torchvision": _build_torchvision, "factory": _build_factory}
    if kind in builders:
        _check_size_on_meta(lambda: builders[kind](location, source), source)
        model = builders[kind](location, source)
    elif kind == "pickle":
        model = _load_pickled_module(location, allow_pickle)
    else:
        raise SourceError(f"{source.spec!r} names no architecture; {ARCH_HINT}")
    if source.weights and not (kind == "timm" and source.pretrained):
        found = read_weights_file(source.weights, use_ema=source.use_ema, allow_pickle=allow_pickle)
        if kind == "torchvision" and source.pretrained and hasattr(model, "backbone"):
            load_backbone(model, found.tensors, source)
        else:
            load_file_weights(model, found.tensors, what=source.weights)
    return model


def load_backbone(model: nn.Module, tensors: dict, source: ModelSource) -> None:
    """``--pretrained --weights FILE`` for a torchvision detection or segmentation
    builder: FILE holds its backbone's classification weights (what ``weights_backbone``
    would download), loaded into the backbone by name (the classifier's are unused). A
    detector's backbone then gets ``FrozenBatchNorm2d``, as torchvision gives it."""
    from timm.layers import freeze_batch_norm_2d

    name = source.spec.removeprefix("torchvision:")
    if name.startswith("ssd"):
        raise SourceError(f"--pretrained --weights: {source.spec} rebuilds its backbone's layers "
                          "under other names; give the whole model's weights with --weights alone")
    body = getattr(model.backbone, "body", model.backbone)
    if "_v2" not in name and type(model).__module__.startswith("torchvision.models.detection"):
        freeze_batch_norm_2d(body)  # as torchvision's v1 detectors do with backbone weights
    wanted = [k for k in body.state_dict() if not k.endswith("num_batches_tracked")]
    prefix = next((p for p in ("", "features.") if all(p + k in tensors for k in wanted)), None)
    if prefix is None:
        missing = next(k for k in wanted if k not in tensors and f"features.{k}" not in tensors)
        raise SourceError(f"{source.weights} does not hold the backbone of {source.spec} (no "
                          f"{missing!r}); --pretrained --weights takes the backbone's "
                          "classification weights, --weights alone a whole model's")
    load_weights(body, {k: tensors[prefix + k] for k in wanted}, what=str(source.weights))


def did_you_mean(name: str, prefix: str = "") -> str:
    """``; did you mean timm:NAME?`` for what a bare or misspelt model name meant: the
    timm or torchvision model of that name, else timm names near it (by spelling, then by
    containing it); nothing if none."""
    import timm
    import torchvision

    if timm.is_model(name.split(".")[0]) or name in torchvision.models.list_models():
        meant = [f"timm:{name}" if timm.is_model(name.split(".")[0]) else f"torchvision:{name}"]
    else:
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
        meant = [f"timm:{m}" for m in (close + [m for m in timm.list_models(f"*{name}*")
                                                if m not in close])[:3]]
    return f"; did you mean {prefix}{f' or {prefix}'.join(meant)}?" if meant else ""


def _check_size_on_meta(build, source: ModelSource) -> None:
    """A large size among the kwargs (``width=50000``): built on the meta device first."""
    values = [v for x in source.kwargs.values() for v in (x if isinstance(x, list) else [x])]
    if not any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > 4096 for v in values):
        return
    import torch

    try:
        with torch.device("meta"):
            probe = build()
    except Exception:
        return  # the real build reports the problem
    n = sum(t.numel() for t in [*probe.parameters(), *probe.buffers()])
    if n > MAX_MODEL_ELEMENTS:
        raise SourceError(f"{source.spec} with {_kwargs_text(source.kwargs)} would have {n:,} "
                          f"parameters (more than {MAX_MODEL_ELEMENTS:,}); refused")


def _build_failed(what: str, kwargs: dict, e: Exception) -> SourceError:
    return SourceError(f"{what} could not be built with {_kwargs_text(kwargs) or 'no arguments'}: "
                       f"{type(e).__name__}: {first_line(e)[:200]}")


def _build_timm(name: str, source: ModelSource) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise SourceError(f"unknown timm model {name!r}{did_you_mean(name)}")
    kwargs = dict(source.kwargs)
    if source.pretrained_cfg:
        kwargs["pretrained_cfg"] = source.pretrained_cfg
    if source.pretrained and source.weights:
        require_file(source.weights)
        kwargs["pretrained_cfg_overlay"] = dict(file=str(source.weights))
    try:
        return timm.create_model(name, pretrained=source.pretrained, **kwargs)
    except Exception as e:  # e.g. num_classes=-1: torch refuses the layer shapes
        if source.pretrained and isinstance(e, (OSError, ValueError)):
            raise SourceError(f"could not load weights {source.weights}: {first_line(e)}"
                              if source.weights else f"could not fetch pretrained weights for "
                              f"timm:{name} ({type(e).__name__}); offline, pass a local file "
                              "with --weights PATH") from None
        raise _build_failed(f"timm:{name}", source.kwargs, e) from None


def _build_torchvision(name: str, source: ModelSource) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise SourceError(f"unknown torchvision model {name!r}{did_you_mean(name)}")
    builder = torchvision.models.get_model_builder(name)
    if source.pretrained and not source.weights:
        raise SourceError(f"--pretrained for torchvision:{name} takes its weights from a local "
                          "file (torchvision's downloads are never made): add --weights PATH, "
                          "for a detection or segmentation model its backbone's")
    # never fetch a backbone: a detection or segmentation builder's default does
    offline = {"weights_backbone": None} if "weights_backbone" in signature(builder).parameters \
        else {}
    try:
        return builder(weights=None, **offline, **source.kwargs)
    except Exception as e:
        raise _build_failed(f"torchvision:{name}", source.kwargs, e) from None


def _build_factory(location: str, source: ModelSource) -> nn.Module:
    factory = import_object(location, root=source.root)
    try:
        with on_import_path(code_folder(location, source.root)):  # a factory's own lazy imports
            model = factory(**source.kwargs)
    except Exception as e:  # the user's code, called with the user's (or a file's) kwargs
        raise _build_failed(location, source.kwargs, e) from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"{location} returned {type(model).__name__}, not an nn.Module")
    return model


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


# --- what the source says about the model's input ---------------------------------------

def model_data_config(model: nn.Module, kind: str | None = None) -> dict:
    """What the source says about the model's input: timm's pretrained config, for a 2-D
    RGB torchvision model its ImageNet preprocessing, else only an input size guessed
    from the first conv (a user's model was normalised as its author chose)."""
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
        data.update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],  # ImageNet's
                    interpolation="bilinear", crop_pct=0.875)
    return data


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
            raise SourceError(f"the checkpoint records {len(values)} {key} values for {channels} "
                              f"input channels; record {channels} with "
                              f"`gct-surgery inject ... --{key} ...`")
