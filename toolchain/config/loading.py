"""Building a Config from YAML and `--set key=value` overrides: every value checked against
its field's annotation (converted only where lossless), unknown keys refused with the known
ones listed, then each section's own validation."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from toolchain.config.sections import Config
from toolchain.errors import UserError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # optional: the one type's own error (a nested section's unknown key)
            return _coerce(value, args[0], key)
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError as e:
                errors.append(e)
        expected = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise UserError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            (arg,) = typing.get_args(tp)
            return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, arg = typing.get_args(tp)
            return {str(k): _coerce(v, arg, f"{key}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads 3e-4 (no dot) as a string; accept any float literal
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `a.b=value` override (value parsed as YAML) to a nested dict, returning a copy."""
    if "=" not in assignment:
        raise UserError(f"--set expects key=value, got '{assignment}'")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return assign(data, key.strip(), value, f"--set {key}")


def assign(data: dict, key: str, value: Any, where: str = "") -> dict:
    """A copy of the nested dict `data` with the dotted `key` set to `value` as it is (a typed
    command-line flag: `--teacher 2024` stays the string '2024')."""
    out = _deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise UserError(f"{where or key}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value
    return out


def config_field(key: str) -> tuple[Any, Any]:
    """(annotation, default) of a dotted config key such as 'distill.steps': what a command-line
    flag for that key parses to and what it defaults to, read from the dataclasses."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise KeyError(f"no config key {key}")
        f = fields[part]
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            return tp, default
        cls = tp
    raise KeyError(key)


def _deepcopy(d):
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(data: dict | None, overrides: Sequence[str] = (), fields: Mapping[str, Any] | None = None) -> Config:
    """A validated Config from plain data, then `--set` overrides, then typed field assignments
    (command-line flags, which win over both)."""
    data = dict(data or {})
    for o in overrides:
        data = apply_override(data, o)
    for key, value in (fields or {}).items():
        data = assign(data, key, value)
    config = _build(Config, data, "")
    config.validate()
    return config


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), fields: Mapping[str, Any] | None = None
) -> Config:
    """The one way every command builds its configuration: YAML file, `--set`, flags, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(
                f"{path} must hold a mapping of sections (teacher:, student:, ...), not {type(data).__name__}"
            )
    return from_dict(data, overrides, fields)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
