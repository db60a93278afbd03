"""Command-line values for a recipe's stage fields (``--epochs``, ``--lr``, ``--mixup``...).

Each value is either one value for every stage (``--epochs 3``) or per stage,
``STAGE=VALUE,...`` (``--epochs gates=2,full=3``; stages not named keep the recipe's).
A stage name the recipe lacks is refused, naming the ones it has. The values are
checked by ``Stage`` itself, so a recipe file and the command line accept the same.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from ..errors import UserError
from .recipe import Recipe
from .stages import Stage

_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _convert(field: str, text: str) -> Any:
    """``text`` as the type of the stage field (``int``, ``float``...)."""
    annotation = next(f.type for f in fields(Stage) if f.name == field)
    kind = _KINDS[str(annotation).split("|")[0].strip()]
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{_flag(field)} {text!r}: give {'a whole number' if kind is int else 'a number'}"
                        f", or STAGE={'N' if kind is int else 'VALUE'},... per stage "
                        f"(e.g. {_flag(field)} gates=2,full=3)") from None


def per_stage(recipe: Recipe, field: str, value: Any) -> dict[str, Any]:
    """``{stage name: value}`` for one option: one value for all, or ``STAGE=VALUE,...``."""
    names = [s.name for s in recipe.stages]
    if not isinstance(value, str):
        return dict.fromkeys(names, value)
    if "=" not in value:
        return dict.fromkeys(names, _convert(field, value.strip()))
    chosen: dict[str, Any] = {}
    for part in value.split(","):
        name, sep, text = (p.strip() for p in part.partition("="))
        if not sep or not name or not text:
            raise UserError(f"{_flag(field)} {value!r}: write one value, or STAGE=VALUE pairs "
                            f"separated by commas (e.g. {_flag(field)} {names[0]}=...)")
        if name not in names:
            raise UserError(f"{_flag(field)}: the recipe ({recipe.source}) has no stage {name!r}; "
                            f"its stages are {', '.join(names)}")
        chosen[name] = _convert(field, text)
    return chosen


def override_stages(recipe: Recipe, **values: Any) -> Recipe:
    """The recipe with each given field (None: not given) replaced in its stages."""
    changes: dict[str, dict[str, Any]] = {s.name: {} for s in recipe.stages}
    for field, value in values.items():
        if value is None:
            continue
        if field not in Stage.field_names():
            raise TypeError(f"override_stages: {field!r} is not a Stage field")
        for name, v in per_stage(recipe, field, value).items():
            changes[name][field] = v
    if not any(changes.values()):
        return recipe
    return Recipe(tuple(replace(s, **changes[s.name]) for s in recipe.stages), recipe.source)
