"""Job specs: each job's parameters declared once, as a frozen dataclass beside the job.

A spec's fields carry their help text (`param`). From that one declaration come:

- the job's command line: `parser(Spec, prog, doc)` makes one `--field-name` option per
  field (a bool gets `--x/--no-x`, a tuple takes several values), `from_args` builds the
  spec from it and `to_argv(spec)` is the command line that rebuilds a spec;
- a run config's section of the job: `section(Spec, raw, managed, where, errors)` checks a
  mapping of the fields a user may set (those the run sets for each step are `managed`);
- what "done" means: `fingerprint(spec)` hashes the fields that decide the job's outputs
  (fields declared `result=False`, e.g. workers or a task's index, do not), and every job's
  `is_done(spec)` compares it, with the fingerprints of its inputs, to the record its outputs
  carry.

A default is written once, in the spec: launch's plan and the run config leave out what the
user did not set.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def param(default: Any = dataclasses.MISSING, help: str = "", *, result: bool = True, env: str | None = None,
          choices: Sequence | None = None):
    """A spec field: its default (none: required), its help line, whether it decides the
    job's outputs (`result`), an environment variable that supplies the command line's
    default (`env`, e.g. Slurm's array index) and the allowed values (`choices`)."""
    metadata = {"help": help, "result": result, "env": env, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=metadata)


def fields(spec_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(spec_cls) if f.init]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base(hint) -> tuple[type, bool]:
    """(the field's type without Optional, whether None is allowed)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else str), type(None) in args
    return hint, False


def _is_tuple(hint) -> bool:
    return typing.get_origin(hint) is tuple or hint is tuple


def _item_type(hint):
    args = typing.get_args(hint)
    return args[0] if args else str


def _bool_arg(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parser(spec_cls, prog: str, description: str | None = None, parser_cls=None) -> argparse.ArgumentParser:
    """The job's command line: one option per field of `spec_cls`."""
    if parser_cls is None:
        from common.cli import ArgumentParser as parser_cls
    p = parser_cls(prog=prog, description=description)
    hints = typing.get_type_hints(spec_cls)
    for f in fields(spec_cls):
        base, optional = _base(hints[f.name])
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help") or " ", "dest": f.name}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if meta.get("env") and os.environ.get(meta["env"]) is not None:
            default = os.environ[meta["env"]]
            kwargs["help"] += f" (default: ${meta['env']})"
        if base is bool:
            if optional:
                kwargs.update(type=_bool_arg, metavar="{true,false}")
            else:
                kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_tuple(base):
            kwargs.update(nargs="+" if required else "*", type=_item_type(base), metavar=f.name.upper().rstrip("S"))
            default = None if required else list(default)
        else:
            kwargs["type"] = base
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        p.add_argument(option(f.name), **kwargs)
    return p


def from_args(spec_cls: type[T], args: argparse.Namespace) -> T:
    """The spec of a parsed command line (type conversions done by `parser`)."""
    hints = typing.get_type_hints(spec_cls)
    values = {}
    for f in fields(spec_cls):
        value = getattr(args, f.name)
        base, _ = _base(hints[f.name])
        if _is_tuple(base) and value is not None:
            value = tuple(value)
        elif value is not None and base in (int, float, str) and not isinstance(value, base):
            value = base(value)  # an environment variable's default
        values[f.name] = value
    return spec_cls(**values)


def to_argv(spec) -> list[str]:
    """The command line whose `from_args` gives `spec` back."""
    argv: list[str] = []
    hints = typing.get_type_hints(type(spec))
    for f in fields(type(spec)):
        value = getattr(spec, f.name)
        base, optional = _base(hints[f.name])
        if value is None:
            continue
        if base is bool and not optional:
            argv.append(option(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif _is_tuple(base):
            argv += [option(f.name), *map(str, value)]
        else:
            argv += [option(f.name), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def result_fields(spec) -> dict:
    """The fields that decide the job's outputs, JSON-ready."""
    return {f.name: _jsonable(getattr(spec, f.name)) for f in fields(type(spec)) if f.metadata.get("result", True)}


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def fingerprint(spec, **inputs) -> str:
    """A hash of the spec's result fields and of `inputs` (fingerprints of what it reads)."""
    blob = json.dumps({"job": type(spec).__name__, "spec": result_fields(spec), "inputs": inputs}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def section(spec_cls, raw: Any, managed: Sequence[str], where: str, errors: list[str]) -> dict:
    """A run config's section of the job `spec_cls`: its keys checked against the spec's fields
    (`managed` ones are set by the run, not the config) and coerced to their types."""
    from common.config import coerce

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {raw!r}")
        return {}
    hints = typing.get_type_hints(spec_cls)
    names = {f.name: f for f in fields(spec_cls)}
    out = {}
    for key, value in raw.items():
        if key in managed:
            errors.append(f"{where}.{key}: set by the run for each step, not in the config")
        elif key not in names:
            settable = ", ".join(n for n in names if n not in managed)
            errors.append(f"{where}.{key}: unknown key (one of {settable})")
        else:
            base, _ = _base(hints[key])
            coerced = coerce(value, list[_item_type(base)] if _is_tuple(base) else hints[key], f"{where}.{key}",
                             errors)
            choices = names[key].metadata.get("choices")
            if choices and coerced not in choices:
                errors.append(f"{where}.{key}: must be one of {list(choices)}, got {coerced!r}")
            out[key] = tuple(coerced) if _is_tuple(base) and isinstance(coerced, list) else coerced
    return out


def problems(spec) -> list[str]:
    """What the spec's own `problems()` finds in its values ("field: ..." each; none when the
    spec declares no checks)."""
    return spec.problems() if hasattr(spec, "problems") else []


def check(spec) -> None:
    """UsageError listing the spec's problems, if any."""
    from common.cli import UsageError

    if problems(spec):
        raise UsageError("; ".join(problems(spec)))


def build(spec_cls: type[T], managed: dict, chosen: dict) -> T:
    """The spec of a step: the values the run sets (`managed`), the config's `chosen` ones, and
    the spec's own defaults for the rest."""
    return spec_cls(**{**chosen, **managed})
