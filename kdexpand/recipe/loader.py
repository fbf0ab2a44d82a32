"""Load recipes from YAML: ``base:`` inheritance, ``--set`` overrides and readable errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdexpand.recipe.schema import Recipe
from kdexpand.registry import closest_match

__all__ = [
    "RecipeError",
    "apply_override",
    "dump_recipe",
    "flatten_keys",
    "load_recipe",
    "load_recipe_dict",
    "validate_recipe",
]


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message has one line per problem."""


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge, override and validate a recipe file.

    Args:
        path: YAML recipe file.
        overrides: ``key.sub=value`` strings applied after inheritance. Each value is parsed
            as YAML like the recipe files, so ``3``, ``true``, ``null`` and ``[50, 100]`` get
            their YAML types. E-notation such as ``1e2``, ``5.12e2`` or ``1e-3`` is a float.

    Raises:
        RecipeError: The file is missing or malformed, repeats a key, inherits in a cycle,
            or fails validation.
    """
    path = Path(path)
    raw = load_recipe_dict(path)
    raw.setdefault("name", path.stem)
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, source=str(path))


def load_recipe_dict(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and merge it over its ``base:`` recipes, without validating."""
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise RecipeError(f"recipe inheritance cycle: {cycle}; remove one of the base: keys")
    if not path.is_file():
        where = f" (base of {_chain[-1]})" if _chain else ""
        raise RecipeError(f"recipe file {path} not found{where}")

    with path.open() as stream:
        try:
            raw = _parse_yaml(stream)
        except DuplicateKeyError as error:
            raise RecipeError(f"recipe {path}: {error}") from error
        except yaml.YAMLError as error:
            raise RecipeError(f"recipe {path} is not valid YAML: {error}".replace("\n", " ")) from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")

    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(
            f"recipe {path}: base must be a file path or a list of file paths, got {bases!r}"
        )

    # Bases merge in order, so later ones override earlier ones; the file itself goes last.
    merged: dict[str, Any] = {}
    for base in bases:
        parent = load_recipe_dict(path.parent / base, (*_chain, resolved))
        parent.pop("name", None)
        merged = _deep_merge(merged, parent)
    return _deep_merge(merged, raw)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` over ``base``: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# A number in e-notation, such as 1e2, 5.12e2, .5e3 or -5E-3. PyYAML implements YAML 1.1,
# whose floats need a dot and, with an exponent, a sign on it ("5.12e+2"), so 1e2 and 5.12e2
# would stay strings.
_E_NOTATION = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that repeats a key: its dotted path and the lines of both entries (from 1)."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line}); remove one of them")
        self.key = key
        self.line = line
        self.first_line = first_line


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads all e-notation as floats and rejects repeated keys.

    PyYAML keeps the last value of a repeated key, so a second ``lr:`` would silently win.
    Keys that a ``<<`` merge brings in may be overridden as usual.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_duplicate_keys(self, node, "", set())
        return super().construct_document(node)


class _RecipeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes strings which :class:`_RecipeLoader` would read as floats."""


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _E_NOTATION, list("-+0123456789."))
_RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", _E_NOTATION, list("-+0123456789."))


def _parse_yaml(stream: Any) -> Any:
    """Parse one YAML document with :class:`_RecipeLoader`; no python tags, as with safe_load."""
    return yaml.load(stream, Loader=_RecipeLoader)


def _check_duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, path: str, visited: set[int]) -> None:
    """Raise a DuplicateKeyError for the first mapping under ``node`` that repeats a key."""
    # An alias reuses its anchor's node, and a recursive anchor makes a cycle.
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(loader, item, _join(path, index), visited)
    if not isinstance(node, yaml.MappingNode):
        return

    first_lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            _check_duplicate_keys(loader, value_node, path, visited)
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first_lines:
            raise DuplicateKeyError(_join(path, key), line, first_lines[key])
        first_lines[key] = line
        _check_duplicate_keys(loader, value_node, _join(path, key), visited)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set one ``a.b.c=value`` override in the raw recipe mapping, in place.

    Missing or null mappings on the way are created, so ``teacher.model=resnet18`` works on
    a recipe without a teacher. A numeric part indexes into a list
    (``distill.losses.0.weight=0.5``). Unknown keys are left for validation to report.
    """
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} is not of the form key.sub=value, e.g. train.lr=0.1")
    try:
        value = _parse_yaml(text)
    except DuplicateKeyError as error:
        # An override is one line, so the message leaves out the line numbers.
        raise RecipeError(f"override {override!r}: duplicate key {error.key!r}; remove one of them") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"override {override!r}: value is not valid YAML: {error}".replace("\n", " ")) from error

    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _descend(node, part, ".".join(parts[: depth + 1]), override)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, override)] = value
    else:
        node[last] = value


def _descend(node: Any, part: str, path: str, override: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, path, override)]
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise RecipeError(
            f"override {override!r}: {path} is a value ({child!r}), not a section; "
            f"set {path}=... instead"
        )
    return child


def _list_index(node: list[Any], part: str, path: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(
            f"override {override!r}: {path} must index the list of {len(node)} items with 0..{len(node) - 1}"
        )
    return int(part)


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw mapping into a :class:`Recipe`, with key paths and typo hints in errors.

    One problem gives a one-line message; several give one indented line each.
    """
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        lines = [_describe_error(item) for item in error.errors()]
        if len(lines) == 1:
            raise RecipeError(f"{source}: invalid recipe: {lines[0].strip()}") from None
        raise RecipeError(f"{source}: invalid recipe\n" + "\n".join(lines)) from None


def _describe_error(item: dict[str, Any]) -> str:
    """Describe one pydantic error as ``key.path: problem``, with the closest valid key."""
    location = [part for part in item["loc"] if not _is_union_tag(part)]
    path = ".".join(str(part) for part in location) or "<top level>"
    if item["type"] == "value_error":
        # A check's input is a whole section, too long to print. A message that starts with
        # a dotted key path already names the location.
        message = item["msg"].removeprefix("Value error, ")
        names_key = re.match(r"[a-z_]+\.[a-z_]", message) is not None
        return f"  {message}" if names_key or not location else f"  {path}: {message}"
    if item["type"] != "extra_forbidden":
        value = item.get("input")
        got = "" if isinstance(value, dict) else f" (got {value!r})"
        return f"  {path}: {item['msg']}{got}"

    valid = _valid_keys(location[:-1])
    # Recipe keys are lower case, so "LR" is compared as "lr".
    hint = closest_match(str(location[-1]).lower(), valid)
    did_you_mean = f"did you mean {hint!r}? " if hint else ""
    return f"  {path}: unknown key; {did_you_mean}valid keys here: {', '.join(valid)}"


# Names that pydantic inserts into an error location for the member of a union that it tried.
_SCALAR_TAGS = frozenset({"int", "float", "str", "bool", "bytes", "none", "decimal", "path"})


def _is_union_tag(part: Any) -> bool:
    # A tag is a model class name ("TeacherConfig"), a scalar type or a generic ("list[int]").
    # Recipe keys are compared by exact name, so an upper-case key such as "TRAIN" is kept.
    if not isinstance(part, str):
        return False
    return "[" in part or part.lower() in _SCALAR_TAGS or part in _schema_model_names()


def _schema_model_names() -> set[str]:
    """Return the class names of every pydantic model reachable from :class:`Recipe`."""
    names: set[str] = set()
    pending: list[type[BaseModel]] = [Recipe]
    while pending:
        model = pending.pop()
        if model.__name__ in names:
            continue
        names.add(model.__name__)
        for field in model.model_fields.values():
            inner = _model_in(field.annotation)
            if inner is not None:
                pending.append(inner)
    return names


def _valid_keys(location: list[Any]) -> list[str]:
    """List the fields of the schema section at ``location`` (list indexes are skipped)."""
    model: type[BaseModel] = Recipe
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return sorted(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model inside ``Model``, ``Model | None`` or ``list[Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        model = _model_in(argument)
        if model is not None:
            return model
    return None


def dump_recipe(recipe: Recipe) -> str:
    """Return the resolved recipe as YAML that :func:`load_recipe` reads back unchanged."""
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=_RecipeDumper, sort_keys=False)


def flatten_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys, as ``--set`` names them: ``{"train.lr": 0.01}``.

    Lists stay whole values, so a changed loss list counts as one changed key.
    """
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten_keys(value, f"{prefix}.{key}" if prefix else key))
    return flat
