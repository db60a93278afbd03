"""Import the command modules that exist; each registers itself on the app.

Lets commands be added one module at a time without touching ``cli/__init__``.
"""
from __future__ import annotations

import importlib
import importlib.util

for _name in ("finetune", "eval", "export", "inspect", "demo"):
    if importlib.util.find_spec(f"{__package__}.{_name}") is not None:
        importlib.import_module(f"{__package__}.{_name}")
