"""YAML -> frozen dataclasses, strict: unknown keys and wrong types are one-line errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

from flowpress.errors import FlowpressError

DISCRIMINATOR = "precision"  # a union of dataclasses is told apart by this key (quantize: {precision: ...})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _tagged(value: Any, options: list[Any], where: str) -> Any:
    """A mapping into the one dataclass of `options` whose DISCRIMINATOR default it names."""
    tags = {typing.get_args(typing.get_type_hints(o)[DISCRIMINATOR])[0]: o for o in options}
    tag = value.get(DISCRIMINATOR, next(iter(tags)))
    if tag not in tags:
        raise FlowpressError(f"{where}.{DISCRIMINATOR}: must be one of {', '.join(map(repr, tags))}, got {tag!r}")
    return from_dict(tags[tag], value, where)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if (
            isinstance(value, dict)
            and options
            and all(dataclasses.is_dataclass(o) and DISCRIMINATOR in typing.get_type_hints(o) for o in options)
        ):
            return _tagged(value, options, where)
        errors = []
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except FlowpressError as err:
                errors.append(str(err))
        raise FlowpressError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise FlowpressError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FlowpressError(f"{where}: must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise FlowpressError(f"{where}: must be a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise FlowpressError(f"{where}: must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: Any, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise FlowpressError."""
    if not isinstance(data, dict):
        raise FlowpressError(f"{where}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FlowpressError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FlowpressError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except FlowpressError as err:
        raise FlowpressError(f"{where}: {err}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FlowpressError(f"{path}: recipe not found; pass an existing file (see examples/digits/recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise FlowpressError(f"{path}: not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise FlowpressError(f"{path}: a recipe must be a YAML mapping")
    return data


def load(cls: Any, path: str | Path) -> Any:
    """A YAML file as dataclass `cls`."""
    return from_dict(cls, load_yaml(path), str(path))


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
