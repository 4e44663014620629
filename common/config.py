"""Typed configs from YAML and `key=value` overrides: the one path every job and launch use.

A config is a dataclass. `from_mapping` builds one from a mapping (a YAML file's content,
a launch section): unknown keys are refused, every value is coerced to its field's type
(YAML 1.1 reads `1e-3` as a string: a float field takes it as 0.001, an integer field
`1e6` as 1000000), nested dataclasses are built alike (an empty section gets its
defaults), and once every value has its type, the dataclass's own `validate()` (a list of
problems) runs. The problems are reported in one `ConfigError` line, each naming its dotted
key (`train.lr: expected a number, got 'abc'`).

`apply_overrides` sets dotted keys in a mapping before it is built, the same for
`python -m launch run` (`train.lr=1e-3`, `executor.slurm.partition=gpu`) and
`python -m pipeline.train` (`lr=1e-3`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key(s)."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML; an empty value is None)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value (dotted keys reach into sections: train.lr=1e-3)")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return [k.strip() for k in key.split(".")], parsed


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of `raw` with every `key=value` of `overrides` set (sections created as needed)."""
    out = _deep_copy(raw)
    for item in overrides:
        path, value = parse_override(item)
        target = out
        for i, part in enumerate(path[:-1]):
            nxt = target.setdefault(part, {})
            if nxt is None:
                nxt = target[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is not a section")
            target = nxt
        target[path[-1]] = value
    return out


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def from_mapping(cls: type[T], raw: Any, where: str = "", prefix: str = "", validate: bool = True) -> T:
    """A validated `cls` from `raw`; ConfigError listing every problem (`where`: the source,
    e.g. a file name; `prefix`: the dotted path of this section; `validate=False`: types only)."""
    errors: list[str] = []
    obj = _build(cls, raw, prefix, errors)
    if not errors and validate:
        errors += _validate(obj, prefix)
    if errors:
        raise ConfigError((f"{where}: " if where else "") + "; ".join(errors))
    return obj


def _build(cls, raw, prefix: str, errors: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key in raw:
        if key not in fields:
            errors.append(f"{_join(prefix, key)}: unknown key")
    for name in fields:
        if name in raw:
            values[name] = coerce(raw[name], hints[name], _join(prefix, name), errors)
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    errors += [f"{_join(prefix, n)}: required" for n in missing]
    if errors:
        return None
    return cls(**values)


def _validate(obj, prefix: str) -> list[str]:
    """The dataclass's own validate() (problems without the prefix), nested sections' first."""
    errors = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            errors += _validate(value, _join(prefix, f.name))
    if hasattr(obj, "validate"):
        errors += [f"{prefix}.{e}" if prefix else e for e in obj.validate()]
    return errors


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def coerce(value: Any, hint, name: str, errors: list[str]) -> Any:
    """`value` as type `hint` (Optional, bool, int, float, str, list, dict, a dataclass), or
    the value unchanged with a problem appended to `errors`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], name, errors)
        for a in inner:  # the first type that takes the value
            trial: list[str] = []
            out = coerce(value, a, name, trial)
            if not trial:
                return out
        errors.append(f"{name}: expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
        return value
    if value is None and (dataclasses.is_dataclass(hint) or hint is dict or origin is dict):
        return hint() if dataclasses.is_dataclass(hint) else {}  # an empty section: its defaults
    if value is None:
        errors.append(f"{name}: must not be empty")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name, errors)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e6 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a pretrained tag or partition that YAML read as a number
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [coerce(v, item, f"{name}[{i}]", errors) for i, v in enumerate(value)]
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            if len(args) == 2:
                return {k: coerce(v, args[1], f"{name}.{k}", errors) for k, v in value.items()}
            return dict(value)
    else:
        raise TypeError(f"{name}: unsupported config type {hint!r}")
    errors.append(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    return names.get(hint, names.get(typing.get_origin(hint), getattr(hint, "__name__", str(hint))))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
