"""gct-surgery: put Gated Channel Transformation gates into a trained CNN.

The package imports torch and timm lazily (PEP 562 ``__getattr__``), so the command
line answers ``--help`` at once.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GCT": "gate", "GateConfig": "gate", "gct": "gate", "gct_reference": "gate",
    "set_gate_impl": "gate",
    "TargetSpec": "targets", "select_targets": "targets",
    "inject": "surgery", "remove": "surgery", "gates": "surgery", "gated_modules": "surgery",
    "InjectionReport": "surgery",
    "ModelSource": "sources", "build_model": "sources",
    "load": "checkpoint", "save": "checkpoint", "read_metadata": "checkpoint",
    "UserError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'gct_surgery' has no attribute {name!r}")
