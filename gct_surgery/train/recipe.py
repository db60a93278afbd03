"""Recipes: an ordered list of stages in a TOML or YAML file.

A recipe file holds ``stage`` entries (TOML ``[[stage]]`` tables, or a YAML list under
``stage:``/``stages:``), each with the fields of ``stages.Stage``. Optional top-level
keys are defaults for every stage. Unknown keys are errors, so a typo never silently
falls back to a default. The built-in default, ``recipes/default.toml``, is gates
then full; it documents its own arithmetic.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from .stages import Stage

DEFAULT_RECIPE_PATH = Path(__file__).resolve().parent / "recipes" / "default.toml"


class RecipeError(UserError):
    """A recipe file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    source: str = "built-in default"

    def to_dict(self) -> dict:
        return {"source": self.source, "stages": [s.to_dict() for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def only(self, kind: str) -> "Recipe":
        """The recipe's first stage of one kind, alone (``--stage gates``)."""
        for s in self.stages:
            if s.kind == kind:
                return Recipe((s,), f"{self.source}, stage {s.name!r} only")
        raise RecipeError(f"{self.source} has no {kind!r} stage")

    def override(self, **changes: Any) -> "Recipe":
        """Every stage with the given fields replaced (``--epochs``, ``--lr``); None skips."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        return Recipe(tuple(replace(s, **changes) for s in self.stages), self.source)


def default_recipe() -> Recipe:
    return load_recipe(DEFAULT_RECIPE_PATH, label="built-in default")


def load_recipe(path: str | Path, *, label: str | None = None) -> Recipe:
    """Read and validate a recipe file (.toml, .yaml or .yml)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no such recipe file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            doc = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            raise RecipeError(f"{path}: a recipe is a .toml or .yaml file")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(doc, source=label or str(path))


def recipe_from_dict(doc: Any, *, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe document; every message names the stage and the key."""
    if isinstance(doc, list):
        doc = {"stage": doc}
    if not isinstance(doc, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a list of stages")
    doc = dict(doc)
    if "stages" in doc and "stage" not in doc:
        doc["stage"] = doc.pop("stages")
    entries = doc.pop("stage", None)
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{source}: no stages; add [[stage]] tables (TOML) or a 'stages:' list (YAML)")
    allowed = Stage.field_names()
    defaults = {k: v for k, v in doc.items() if k not in ("name", "description", "source")}
    _check_keys(defaults, allowed - {"name", "kind"}, f"{source}: top level")
    stages, names = [], set()
    for i, entry in enumerate(entries, 1):
        where = f"{source}: stage {i}"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where} is not a table of settings")
        _check_keys(entry, allowed, where)
        merged = {**defaults, **entry}
        merged.setdefault("name", merged.get("kind", f"stage{i}"))
        _read_numbers(merged, where)
        if "kind" not in merged:
            raise RecipeError(f"{where} ({merged['name']!r}) has no kind; use kind = \"gates\", \"head\" or \"full\"")
        if merged["name"] in names:
            raise RecipeError(f"{where}: stage name {merged['name']!r} is used twice")
        names.add(merged["name"])
        try:
            stages.append(Stage(**merged))
        except RecipeError:
            raise
        except UserError as e:
            raise RecipeError(f"{source}: {e}") from None
        except TypeError as e:
            raise RecipeError(f"{where}: {e}") from None
    return Recipe(tuple(stages), source)


def _read_numbers(entry: dict, where: str) -> None:
    """A float field written as text (YAML 1.1 reads ``lr: 1e-3`` as the string "1e-3")
    becomes the number; text that is not a number is refused naming the key."""
    for key in (f.name for f in fields(Stage) if "float" in str(f.type)):
        value = entry.get(key)
        if isinstance(value, str):
            try:
                entry[key] = float(value)
            except ValueError:
                raise RecipeError(f"{where}: {key} must be a number, got {value!r}") from None


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(allowed))}")
