"""Typed config loading: YAML files plus ``--section.field=value`` overrides.

Any ``@dataclass`` tree works: nested dataclasses are sections, leaves are ints, floats, bools,
strings, ``Optional`` / ``Literal`` / ``list`` / ``tuple`` / ``dict`` of those. Unknown keys and
values of the wrong type are errors that name the key; all of them are reported together.

    cfg = load_config(ExperimentConfig, "tiny_cpu.yaml", ["--schedule.train_steps=5"])
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megatron_ext.config.errors import ConfigError, Problem

T = TypeVar("T")


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and dotted overrides; raises ConfigError."""
    data: dict = {}
    if path is not None:
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                [
                    Problem(
                        str(path),
                        type(loaded).__name__,
                        "top level must be a mapping",
                        "write the file as `section: {field: value}`",
                    )
                ]
            )
        data = loaded or {}
    data = apply_overrides(data, overrides)
    problems: list[Problem] = []
    cfg = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML file; a missing or unreadable file and a syntax error are ConfigErrors."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(
            [Problem("--config", str(path), f"cannot be read ({exc.strerror})", "give a YAML file")]
        ) from exc
    with handle:
        try:
            return yaml.safe_load(handle)  # a syntax error names the file, line and column
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(
                [Problem("--config", str(path), f"is not valid YAML: {exc}", "correct the file")]
            ) from exc


def from_dict(cls: type[T], data: dict) -> T:
    """Strictly build ``cls`` from a nested dict; raises ConfigError listing every problem."""
    problems: list[Problem] = []
    cfg = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (tuples become lists) that ``from_dict`` accepts back."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with ``--a.b.c=value`` overrides applied (values parsed as YAML)."""
    result = _deep_copy(data)
    for raw in overrides:
        item = raw[2:] if raw.startswith("--") else raw
        if "=" not in item:
            raise ConfigError(
                [
                    Problem(
                        raw,
                        None,
                        "override must look like --section.field=value",
                        "add `=value` after the dotted key",
                    )
                ]
            )
        key, value_text = item.split("=", 1)
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    [
                        Problem(
                            key,
                            child,
                            f"`{part}` is a value, not a section",
                            "override a field inside a section",
                        )
                    ]
                )
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value_text) if value_text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                [
                    Problem(
                        key,
                        value_text,
                        f"the value is not valid YAML ({str(exc).splitlines()[0]})",
                        "quote it, or write a list as [a, b] and a mapping as {k: v}",
                    )
                ]
            ) from exc
    return result


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _build(cls: type, data: Any, prefix: str, problems: list[Problem]) -> Any:
    if not isinstance(data, dict):
        problems.append(
            Problem(
                prefix or cls.__name__,
                data,
                "expected a section (mapping)",
                f"give {cls.__name__} fields as `key: value` pairs",
            )
        )
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            problems.append(
                Problem(
                    f"{prefix}{key}",
                    data[key],
                    f"unknown key in {cls.__name__}",
                    f"remove it or use one of: {known}",
                )
            )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}", problems)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(Problem(prefix or cls.__name__, None, str(exc), "correct the section"))
        return cls()


def _coerce(tp: Any, value: Any, key: str, problems: list[Problem]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[Problem] = []
            result = _coerce(arg, value, key, trial)
            if not trial:
                return result
        problems.append(Problem(key, value, f"expected {tp}", "give a value of that type"))
        return value
    if origin is typing.Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            # YAML 1.1 reads an unquoted on / off (also yes / no) as a boolean.
            value = "on" if value else "off"
        if value not in args:
            problems.append(
                Problem(key, value, f"must be one of {list(args)}", f"choose one of {list(args)}")
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(key, value, "expected a list", "write it as [a, b, ...]"))
            return value
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(key, value, "expected a mapping", "write it as {k: v}"))
            return value
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _coerce(key_tp, k, f"{key}.{k}", problems): _coerce(value_tp, v, f"{key}.{k}", problems)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(key, value, "expected true or false", "write true or false"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(Problem(key, value, "expected an integer", "write a whole number"))
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(key, value, "expected a number", "write a number like 3e-4"))
            return value
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            problems.append(
                Problem(
                    key,
                    value,
                    "expected a string; YAML reads an unquoted yes / no / on / off / true / false "
                    "(the language code `no` too) as a boolean",
                    "quote it, e.g. 'no'",
                )
            )
        elif not isinstance(value, str):
            problems.append(Problem(key, value, "expected a string", "quote the value"))
        return value
    return value
