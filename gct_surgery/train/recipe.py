"""Recipes: an ordered list of stages in a TOML or YAML file, and the command line's
changes to them.

A recipe file holds ``stage`` entries (TOML ``[[stage]]`` tables, or a YAML list under
``stage:``/``stages:``), each with the fields of ``stages.Stage``. Optional top-level
keys are defaults for every stage. Unknown keys are errors, so a typo never silently
falls back to a default. The built-in default, ``recipes/default.toml``, is gates
then full; it documents its own arithmetic.

A command-line value (``--epochs``, ``--lr``, ``--mixup``...) is one value for every
stage (``--epochs 3``) or per stage, ``STAGE=VALUE,...`` (``--epochs gates=2,full=3``;
stages not named keep the recipe's). ``Stage`` checks every value, so a recipe file and
the command line accept the same.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .stages import Stage

DEFAULT_RECIPE_PATH = Path(__file__).resolve().parent / "recipes" / "default.toml"
STAGE_FIELDS = frozenset(f.name for f in fields(Stage))



@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    source: str = "built-in default"

    def to_dict(self) -> dict:
        return {"source": self.source, "stages": [s.to_dict() for s in self.stages]}

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def only(self, kind: str) -> "Recipe":
        """The recipe's first stage of one kind, alone (``--stage gates``)."""
        for s in self.stages:
            if s.kind == kind:
                return Recipe((s,), f"{self.source}, stage {s.name!r} only")
        raise UserError(f"{self.source} has no {kind!r} stage")

    def override(self, **values: Any) -> "Recipe":
        """The recipe with each given stage field replaced (None: not given): one value for
        every stage, or text ``STAGE=VALUE,...`` for the stages it names."""
        stages = {s.name: s for s in self.stages}
        for field, value in values.items():
            flag = "--" + field.replace("_", "-")
            for name, v in self._per_stage(flag, value).items() if value is not None else ():
                try:  # replace() refuses a field Stage lacks; Stage checks the value
                    stages[name] = replace(stages[name], **{field: v})
                except UserError as e:
                    raise UserError(f"{flag} {value!r}: {e}; give one value, or STAGE=VALUE,... "
                                    f"per stage (e.g. {flag} {name}=...)") from None
        return Recipe(tuple(stages.values()), self.source)

    def _per_stage(self, flag: str, value: Any) -> dict[str, Any]:
        names = [s.name for s in self.stages]
        if not isinstance(value, str) or "=" not in value:
            return dict.fromkeys(names, value)
        chosen = {}
        for part in value.split(","):
            name, sep, text = (p.strip() for p in part.partition("="))
            if not sep or not name or not text:
                raise UserError(f"{flag} {value!r}: write one value, or STAGE=VALUE pairs "
                                f"separated by commas (e.g. {flag} {names[0]}=...)")
            if name not in names:
                raise UserError(f"{flag}: the recipe ({self.source}) has no stage {name!r}; "
                                f"its stages are {', '.join(names)}")
            chosen[name] = text
        return chosen


def default_recipe() -> Recipe:
    return load_recipe(DEFAULT_RECIPE_PATH, label="built-in default")


def load_recipe(path: str | Path, *, label: str | None = None) -> Recipe:
    """Read and validate a recipe file (.toml, .yaml or .yml)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such recipe file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"{path}: a recipe is a .toml or .yaml file")
    try:
        doc = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError and friends
        raise UserError(f"{path}: not valid {'TOML' if suffix == '.toml' else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from None
    return recipe_from_dict(doc, source=label or str(path))


def recipe_from_dict(doc: Any, *, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe document; every message names the stage and the key."""
    if not isinstance(doc, dict):
        raise UserError(f"{source}: a recipe is a mapping with a list of stages")
    entries = doc.get("stage", doc.get("stages"))
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: no stages; add [[stage]] tables (TOML) or a 'stages:' "
                        "list (YAML)")
    defaults = {k: v for k, v in doc.items()
                if k not in ("stage", "stages", "name", "description", "source")}
    _check_keys(defaults, STAGE_FIELDS - {"name", "kind"}, f"{source}: top level")
    stages: list[Stage] = []
    for i, entry in enumerate(entries, 1):
        where = f"{source}: stage {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} is not a table of settings")
        _check_keys(entry, STAGE_FIELDS, where)
        merged = {**defaults, **entry}
        merged.setdefault("name", merged.get("kind", f"stage{i}"))
        if "kind" not in merged:
            raise UserError(f"{where} ({merged['name']!r}) has no kind; use kind = \"gates\", "
                            "\"head\" or \"full\"")
        if merged["name"] in (s.name for s in stages):
            raise UserError(f"{where}: stage name {merged['name']!r} is used twice")
        try:
            stages.append(Stage(**merged))
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    return Recipe(tuple(stages), source)


def _check_keys(d: dict, allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                          f"{', '.join(sorted(allowed))}")
