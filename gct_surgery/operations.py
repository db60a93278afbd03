"""The high-level operations behind the commands, usable from Python.

Each function takes plain arguments and returns a dataclass; the CLI only parses
arguments and prints what these return.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from torch import nn

from .core.gate import GateConfig
from .core.model import example_input, max_difference, model_num_classes, run_model
from .core.surgery import InjectionReport, inject
from .core.targets import TargetSpec, select_targets, watch_convs
from .errors import SourceError, first_line
from .io.checkpoint import (RECORD_ATTR, default_checkpoint_name, is_checkpoint, load_checkpoint,
                            run_folder_hint, save)
from .io.metadata import CheckpointMeta
from .io.state_dicts import classes_in, is_safetensors, load_file_weights, read_weights_file
from .io.sources import (ARCH_HINT, ModelSource, build_model, did_you_mean, model_data_config,
                         parse_source, recordable, resolve_hub, timm_hub)
from .io.trust import remember


@dataclass
class Opened:
    """A model as a SOURCE gave it, its new record, and what the user should hear:
    ``notes`` (what the file held) and ``warnings`` (e.g. random weights)."""

    model: nn.Module
    meta: CheckpointMeta
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def open_model(source: str, **options) -> tuple[nn.Module, CheckpointMeta]:
    """Open any SOURCE (see ``sources``) as ``(model, metadata)``; the options are
    ``open_source``'s."""
    opened = open_source(source, **options)
    return opened.model, opened.meta


def open_source(
    source: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    use_ema: bool = False,
    allow_pickle: bool = False,
) -> Opened:
    """Open any SOURCE (see ``sources``).

    A gct-surgery checkpoint brings its own metadata; anything else gets fresh
    metadata that records how to rebuild it. A weights file (another trainer's
    checkpoint included, ``state_dicts``) may name its architecture and gives its class
    count: ``--arch`` and ``--num-classes`` are then not needed.
    """
    kind, location = parse_source(source)
    if kind == "file":
        path = Path(location)
        if not path.exists():
            raise SourceError(f"no such file: {path}{did_you_mean(location)} (a SOURCE is "
                              "timm:NAME, torchvision:NAME, file.py:factory or a checkpoint file)")
        if path.is_dir():
            raise SourceError(run_folder_hint(path) or f"{path} is a folder, not a checkpoint file")
        if is_checkpoint(path):  # a damaged one: load_checkpoint's clear error
            loaded = load_checkpoint(path)
            return Opened(loaded.model, loaded.meta)
        return _open_weights_file(path, arch, num_classes, in_chans, use_ema, allow_pickle)
    if arch is not None:
        raise SourceError("--arch is only for a state-dict file SOURCE")
    if use_ema and not weights:
        raise SourceError("--use-ema takes the EMA weights of a checkpoint file; give the file "
                          f"as the SOURCE: gct-surgery inject FILE --arch {source} --use-ema")
    spec = ModelSource(source, _kwargs(source, num_classes, in_chans), weights=weights,
                       pretrained=pretrained, use_ema=use_ema)
    resolved = resolve_hub(spec, source)
    opened = _open(resolved, allow_pickle, base=source if resolved is not spec else None)
    if kind in ("timm", "torchvision") and not (resolved.weights or resolved.pretrained):
        # gates go on a trained model: a SOURCE without weights is almost never meant
        opened.warnings.append(
            f"{source} has random weights (no --weights, no --pretrained): give your trained "
            f"file (`gct-surgery inject FILE --arch {source}`), --weights PATH"
            + (", or --pretrained for timm's own (from the cache offline)" if kind == "timm" else ""))
    return opened


def _open_weights_file(path: Path, arch: str | None, num_classes: int | None,
                       in_chans: int | None, use_ema: bool, allow_pickle: bool) -> Opened:
    """A state-dict file, or another trainer's checkpoint: its architecture from
    ``--arch`` or the file, its class count from the file unless ``--num-classes``."""
    if arch is not None and parse_source(arch)[0] == "file":
        raise not_an_architecture(arch)
    found = read_weights_file(path, use_ema=use_ema, allow_pickle=allow_pickle)
    if arch is None and found.trainer == "pickled module":
        return _open(ModelSource(f"pickle:{path}"), allow_pickle)
    arch = arch or found.arch
    if arch is None:
        raise SourceError(
            f"{path} is not a gct-surgery checkpoint; if it holds a plain state dict, say "
            "which model it is for with --arch timm:NAME, torchvision:NAME or file.py:factory"
            + ("" if is_safetensors(path) else
               " (a whole pickled module needs --allow-pickle, which runs its code)"))
    source = resolve_hub(ModelSource(arch, _kwargs(arch, num_classes, in_chans)), arch)
    if source.kind == "torchvision" and any(".aux_classifier." in f".{k}" for k in found.tensors):
        source = replace(source, kwargs={**source.kwargs, "aux_loss": True})  # trained with one
    source = replace(source, pretrained=False)  # the file's weights replace the hub's
    model = build_model(source, allow_pickle=allow_pickle)
    classes = classes_in(model, found.tensors, found.num_classes)
    if (num_classes is None and classes is not None and classes != model_num_classes(model)
            and source.kind in ("timm", "torchvision")):
        source = replace(source, kwargs={**source.kwargs, "num_classes": classes})
        model = build_model(source, allow_pickle=allow_pickle)
    prefix = load_file_weights(model, found.tensors, what=str(path))
    opened = _open(replace(source, weights=str(path), use_ema=use_ema), allow_pickle, model=model,
                   found=found.describe(use_ema), base=arch if arch != source.spec else None)
    if found.has_ema and not use_ema:
        opened.notes.append("this file also holds EMA weights; --use-ema takes them")
    if prefix:
        opened.notes.append(f"took the weights under '{prefix}' ({found.trainer or 'the file'} "
                            "saved the network inside a wrapper)")
    return opened


def not_an_architecture(text: str) -> SourceError:
    """``--arch`` given a file or a bare name: the architecture it probably meant."""
    if Path(text).is_file():
        return SourceError(f"{text!r} is a file, not an architecture: {ARCH_HINT}")
    return SourceError(f"{text!r} is neither a file nor an architecture"
                       + (did_you_mean(text, "--arch ") or f"; {ARCH_HINT}"))


def default_output(source: str) -> Path:
    """Where ``inject`` writes without ``-o``: beside a file SOURCE, in the current folder
    for a model name; an existing file is refused, never replaced silently."""
    out = default_checkpoint_name(source)
    if out.exists():
        raise SourceError(f"{out} already exists; pass -o OTHER.safetensors to write elsewhere "
                          f"(or -o {out} to replace it)")
    return out


def _kwargs(spec: str, num_classes: int | None, in_chans: int | None) -> dict:
    if in_chans is not None and parse_source(spec)[0] != "timm":
        raise SourceError("--in-chans applies to timm models only")
    return {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}


def _open(source: ModelSource, allow_pickle: bool, *, model: nn.Module | None = None,
          found: dict | None = None, base: str | None = None) -> Opened:
    """``base``: the hub SOURCE a ``timm:ARCH`` was resolved from; the record's
    ``source`` is the portable ``timm:ARCH``, the ``open`` event keeps the hub source
    (a local-dir by its absolute path), so a gates-only export rebuilds that base."""
    if model is None:
        model = build_model(source, allow_pickle=allow_pickle)
    # recorded so it rebuilds from any folder: a file by its absolute path, a package
    # with the folder it was imported from
    source = recordable(source)
    remember(source.spec, source.root)  # the user named this code: its files reopen freely
    meta = CheckpointMeta(source=source.to_dict(), gate={}, gated=[],
                          data=model_data_config(model, source.kind))
    extra = {k: v for k, v in (("file", found), ("arch", base and source.spec),
                               ("use_ema", source.use_ema)) if v}
    meta = meta.with_event("open", source=_absolute_hub(base) if base else source.spec,
                           kwargs=dict(source.kwargs), weights=source.weights,
                           pretrained=source.pretrained, **extra)
    return Opened(model, meta)


def _absolute_hub(spec: str) -> str:
    """``timm:local-dir:rel`` by its absolute folder, so it means the same from anywhere."""
    hub = timm_hub(spec)
    return f"timm:local-dir:{Path(hub[1]).resolve()}" if hub and hub[0] == "local-dir" else spec


@dataclass
class InjectResult:
    report: InjectionReport
    max_abs_diff: float
    meta: CheckpointMeta
    output: Path | None
    # convs called as functions (F.conv2d) in some forward: no module to gate
    functional_convs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.report.to_dict(), "max_abs_diff": self.max_abs_diff,
                "functional_convs": self.functional_convs,
                "output": str(self.output) if self.output else None}


def inject_model(
    model: nn.Module,
    meta: CheckpointMeta,
    *,
    targets: TargetSpec = TargetSpec(),
    gate: GateConfig = GateConfig(),
    output: str | Path | None = None,
    verify: bool = True,
    input_size: list[int] | None = None,
    data: dict | None = None,
) -> InjectResult:
    """Inject gates, check that the output is unchanged, and save if ``output`` is set.

    The identity check's forward also finds the convs whose input is 1x1 spatially,
    which the selection skips unless ``targets.keep_1x1`` (no check, no skipping).
    ``data`` records the preprocessing (``mean``, ``std``, ``interpolation``,
    ``crop_pct``) that finetune, eval, inspect and export use. The new metadata is
    ``result.meta`` (the model carries it too); ``meta`` itself stays as it was."""
    if meta.gate and meta.gated and GateConfig(**meta.gate) != gate:
        raise SourceError(f"the model already has gates made with {meta.gate}; "
                          "use the same --mode/--eps/--after-relu or start from the base model")
    # later commands run the model on the input size given here
    if input_size or data:
        meta = meta.with_data({**(data or {}), "input_size": input_size})
    x, before, functional = None, None, []
    if verify:
        with _runs_on(x := example_input(meta.data.get("input_size"))):
            convs = watch_convs(model, x)  # one forward: the outputs and what the convs saw
        before, functional = convs.outputs, convs.functional
        if targets.names is None:
            targets = replace(targets, inputs_1x1=tuple(convs.inputs_1x1))
    report = inject(model, targets, gate)
    diff = max_difference(before, run_model(model, x)) if verify else float("nan")
    meta = replace(meta, gate=gate.__dict__.copy(), targets=targets.to_dict(), gated=report.gated)
    meta = meta.with_event("inject", gates_added=report.gates_added, targets=targets.to_dict(),
                           gate=meta.gate, max_abs_diff=diff)
    if output is not None:
        save(model, output, meta)
    setattr(model, RECORD_ATTR, meta)
    return InjectResult(report, diff, meta, Path(output) if output else None, functional)


@contextlib.contextmanager
def _runs_on(x) -> Iterator[None]:
    """A model that fails on the example batch: the input size is the user's to give."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError) as e:
        raise SourceError(f"the model does not run on a batch of size {list(x.shape[1:])} "
                          f"({first_line(e)[:160]}); pass --input-size C,H,W") from None


def plan(model: nn.Module, targets: TargetSpec, gate: GateConfig,
         input_size: list[int] | None = None) -> list[dict]:
    """The dry run: one row per candidate convolution, with what would happen to it.
    With ``input_size``, one forward finds the convs whose input is 1x1 spatially."""
    if input_size and targets.names is None:
        with _runs_on(x := example_input(input_size)):
            targets = replace(targets, inputs_1x1=watch_convs(model, x).inputs_1x1)
    return [{"module": t.name, "kind": t.kind, "in_channels": t.in_channels,
             "kernel": "x".join(map(str, t.kernel_size)), "groups": t.groups,
             "gate_params": 3 * t.in_channels if t.selected and not t.already_gated else 0,
             "action": (("already gated" if t.already_gated else "gate") if t.selected
                        else f"skip: {t.reason}")}
            for t in select_targets(model, targets).targets]
