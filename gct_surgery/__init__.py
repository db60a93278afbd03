"""gct-surgery: put Gated Channel Transformation gates into a trained CNN.

The package imports torch and timm lazily (PEP 562 ``__getattr__``), so the command
line answers ``--help`` at once.
"""
from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

_EXPORTS = {name: module for module, names in {
    "core.gate": ("GCT", "GateConfig", "gct", "gct_reference", "set_gate_impl"),
    "core.targets": ("TargetSpec", "select_targets"),
    "core.surgery": ("inject", "remove", "gates", "gated_modules", "InjectionReport"),
    "io.sources": ("ModelSource", "build_model"),
    "io.checkpoint": ("save", "read_metadata"),
    "train.stages": ("freeze_base", "unfreeze", "param_groups"),
    "errors": ("UserError",),
    "io.trust": ("trusting",),
}.items() for name in names}

__all__ = sorted([*_EXPORTS, "load"])


def load(path: str | os.PathLike | None = None, *, base=None, gates=None,
         allow_pickle: bool = False, trust_source: bool = False):
    """Load a gct-surgery checkpoint as a ready ``nn.Module`` (in eval mode).

    ``load("model.safetensors")`` rebuilds the full model; it carries its record, so
    after training ``save(model, path)`` needs nothing more.
    ``load(base=..., gates="gates.safetensors")`` applies a gates-only file to its base
    (an ``nn.Module``, a SOURCE or a weights file; by default the recorded base) and
    refuses a base whose weights differ from the one the file was made from.

    A file that names Python code (a model factory, a pickled module) is opened only
    when that code is yours: code you named yourself before (``inject``, ``save(source=)``,
    ``gct-surgery trust``), or any code for this call with ``trust_source=True``.
    ``allow_pickle`` lets a ``base`` you give here be a pickle; never a path a file names.
    """
    from .io.trust import trusting

    if (path is None) == (gates is None):
        raise TypeError("load() takes a checkpoint path, or gates= (and base=); one of them")
    with trusting(trust_source):
        if gates is not None:
            from .io.adapter import apply_adapter

            return apply_adapter(gates, base, allow_pickle=allow_pickle)
        from .io.checkpoint import load_checkpoint

        return load_checkpoint(path).model


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'gct_surgery' has no attribute {name!r}")
