"""Recipe files and runs' identity: shipped recipes, YAML files with ``base:``, overrides, and fingerprints.

A recipe is a `Recipe` (`timm_exits.training.recipe_schema`: its sections, keys, types and defaults). A
recipe file is a YAML mapping of its keys, flat (``lr: 0.1``) or by section (``optim: {lr: 0.1}``), or both;
``base: other.yaml`` merges another file first (a path relative to the file's folder, else a shipped recipe of
that name). The recipes shipped in ``timm_exits/training/recipes/`` are selected by name (``-c digits_quick``,
listed by `list_recipes`), any other by its path; every key can be overridden (``lr=0.1`` or ``optim.lr=0.1``,
dotted keys for dict values such as ``model_kwargs.drop_path_rate=0.1``), and an unknown key is an error that
lists the valid ones. A run is identified by its flat recipe without the runtime keys (`_identity`, hashed by
`_fingerprint`): those may change when a run is resumed or evaluated.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .recipe_schema import LATER_KEYS, METHODS, RUNTIME_KEYS, Recipe, RecipeError, _flat_pairs, parse_overrides
from .recipe_types import RecipeYamlLoader

__all__ = [
    "METHODS",
    "Recipe",
    "RecipeError",
    "RECIPE_DIR",
    "list_recipes",
    "resolve_recipe",
    "load_recipe",
    "parse_overrides",
]


RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def list_recipes() -> dict[str, str]:
    """The recipes shipped with timm-exits, selectable by name (``-c digits_quick``).

    Returns:
        Name -> the first line of the file's leading comment ("" when it has none), sorted by name;
        files whose name starts with "_" are shared settings for ``base:`` and left out.
    """
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        first = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                first = line.lstrip("#").strip()
                break
            if line.strip():
                break
        out[path.stem] = first
    return out


def resolve_recipe(source: str | os.PathLike) -> Path:
    """The file of a recipe given as a path or as the name of a shipped recipe.

    Args:
        source: A YAML file's path, or a shipped recipe's name with or without ".yaml".

    Returns:
        The recipe file's path.

    Raises:
        FileNotFoundError: Neither a file nor a shipped recipe; the message lists the shipped ones.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = str(source)
    if "/" not in name and os.sep not in name:
        stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
        shipped = RECIPE_DIR / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
    names = list(list_recipes())
    close = difflib.get_close_matches(Path(name).stem, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(
        f"recipe {name!r} is neither a file nor a shipped recipe.{hint} Shipped recipes (`timm-exits recipes`): "
        f"{', '.join(names)}."
    )


def _parse_yaml(path: Path) -> Any:
    """Parse a recipe file; a syntax error names the file, line and column."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeYamlLoader)  # noqa: S506  (safe)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe {path}{where}: not valid YAML ({problem}). Fix the file there.") from None


def _base_file(recipe: Path, base: Any) -> Path:
    """A ``base:`` entry's file: a path relative to the recipe's folder (or absolute), else a shipped recipe.

    The current directory is never searched, so a recipe reads the same bases wherever it is run from.
    """
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"recipe {recipe}: 'base:' takes a file name or a list of them, got {base!r}.")
    local = recipe.parent / Path(base).expanduser()
    if local.is_file():
        return local
    stem = base[: -len(".yaml")] if base.endswith(".yaml") else base
    if "/" not in base and os.sep not in base and (RECIPE_DIR / f"{stem}.yaml").is_file():
        return RECIPE_DIR / f"{stem}.yaml"
    raise FileNotFoundError(
        f"recipe {recipe}: base {base!r} is neither {local} nor a shipped recipe; a base path is read relative "
        f"to the recipe's folder. Shipped recipes: {', '.join(list_recipes())}."
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys (flat), its ``base:`` files merged first; the name defaults to the file's."""
    path = path.expanduser().resolve()
    if path in seen:
        raise RecipeError(f"recipe {path} includes itself through 'base:'.")
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found.")
    data = _parse_yaml(path) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys, got {type(data).__name__}.")
    bases = data.pop("base", None)
    own = dict(_flat_pairs(data))  # sectioned keys -> flat ones, so a base may be flat and its user sectioned
    merged: dict[str, Any] = {}
    for b in bases if isinstance(bases, list) else [] if bases is None else [bases]:
        merged.update(_read_yaml(_base_file(path, b), (*seen, path)))
    merged.update(own)
    merged.setdefault("name", None)
    if "name" not in own and not seen:  # an explicit `name: null` (a printed or stored recipe's) stays None
        merged["name"] = path.stem
    return merged


def load_recipe(
    source: str | os.PathLike | Mapping[str, Any] | Recipe | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Recipe:
    """Resolve a recipe: defaults, then the YAML file (with its ``base:`` files), dict or recipe, then overrides.

    Args:
        source: Path of a YAML recipe, the name of a shipped recipe (see `list_recipes`), a dict of flat or
            sectioned keys (a stored ``recipe.yaml`` or checkpoint recipe too), a `Recipe`, or None (defaults).
        overrides: Further keys, as a dict or ``key=value`` strings (``section.key`` and dotted keys into
            dict values work too).

    Returns:
        The `Recipe`, every value type-checked.

    Raises:
        RecipeError: An unknown key (the message lists the valid ones) or an invalid value.
    """
    if source is None:
        given: Mapping[str, Any] = {}
    elif isinstance(source, Recipe):
        given = source.flat()
    elif isinstance(source, Mapping):
        given = source
        if "base" in given:
            raise RecipeError("'base:' is only understood in recipe files; merge the dicts yourself.")
    else:
        given = _read_yaml(resolve_recipe(source))
    return Recipe.from_dict(given, overrides)


def _identity(recipe: Recipe | Mapping[str, Any]) -> dict[str, Any]:
    """The flat keys that identify a run: all but the runtime keys, and keys added later at their neutral value.

    Args:
        recipe: A `Recipe`, or a flat recipe dict as stored in checkpoints and run folders.

    Returns:
        Flat key -> value.
    """
    flat = recipe.flat() if isinstance(recipe, Recipe) else recipe
    return {k: v for k, v in flat.items() if k not in RUNTIME_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}


def _fingerprint(recipe: Recipe | Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of the identity's JSON (sorted keys): the run's fingerprint."""
    text = json.dumps(_identity(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every flat key whose value differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
