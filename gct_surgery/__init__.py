"""gct-surgery: put Gated Channel Transformation gates into a trained CNN.

The package imports torch and timm lazily (PEP 562 ``__getattr__``), so the command
line answers ``--help`` at once.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GCT": "core.gate", "GateConfig": "core.gate", "gct": "core.gate", "gct_reference": "core.gate",
    "set_gate_impl": "core.gate",
    "TargetSpec": "core.targets", "select_targets": "core.targets",
    "inject": "core.surgery", "remove": "core.surgery", "gates": "core.surgery", "gated_modules": "core.surgery",
    "InjectionReport": "core.surgery",
    "ModelSource": "io.sources", "build_model": "io.sources",
    "load": "io.checkpoint", "save": "io.checkpoint", "read_metadata": "io.checkpoint",
    "UserError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'gct_surgery' has no attribute {name!r}")
