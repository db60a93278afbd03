"""gct-surgery: put Gated Channel Transformation gates into a trained CNN.

The package imports torch and timm lazily (PEP 562 ``__getattr__``), so the command
line answers ``--help`` at once.
"""
from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

_EXPORTS = {
    "GCT": "core.gate", "GateConfig": "core.gate", "gct": "core.gate", "gct_reference": "core.gate",
    "set_gate_impl": "core.gate",
    "TargetSpec": "core.targets", "select_targets": "core.targets",
    "inject": "core.surgery", "remove": "core.surgery", "gates": "core.surgery", "gated_modules": "core.surgery",
    "InjectionReport": "core.surgery",
    "ModelSource": "io.sources", "build_model": "io.sources",
    "save": "io.checkpoint", "read_metadata": "io.checkpoint",
    "freeze_base": "train.freezing", "unfreeze": "train.freezing", "param_groups": "train.freezing",
    "UserError": "errors", "trusting": "io.trust",
}

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

    if gates is not None:
        if path is not None:
            raise TypeError("load() takes either a checkpoint path or base=/gates=, not both")
        from .io.adapter import apply_adapter

        with trusting(trust_source):
            return apply_adapter(gates, base, allow_pickle=allow_pickle)
    if path is None:
        raise TypeError("load() needs a checkpoint path, or gates= (and base=)")
    from .io.checkpoint import load_checkpoint

    with trusting(trust_source):
        return load_checkpoint(path).model


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'gct_surgery' has no attribute {name!r}")
