"""Typed configuration files shared by agent and aggregator.

Precedence, lowest first: the dataclass defaults, the YAML file, environment variables for paths to
secrets (EPTWATCH_<FIELD>, so a Secret can be mounted anywhere without editing the file), command-line
flags. Unknown keys are errors; every error names the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .model import EraOverride, load_era_overrides

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_check(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_check(k, str, f"{where} key"): _check(v, str, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover - schema bug


def load_config(cls: type[T], path: Path | None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None, secret_paths: tuple[str, ...] = ()) -> T:
    """Build `cls` (a dataclass) from defaults, the YAML file, env overrides and flags."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        for key, value in doc.items():
            key_s = str(key)
            if key_s not in known:
                close = [k for k in sorted(known) if k.split("_")[0] == key_s.split("_")[0]]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{path}: unknown key {key_s!r}{hint}")
            values[key_s] = _check(value, hints[key_s], f"{path}: {key_s}")
    for name in secret_paths:
        var = f"EPTWATCH_{name.upper()}"
        if env and env.get(var):
            values[name] = env[var]
    for key, value in (flags or {}).items():
        if value is not None:
            if key not in known:
                raise ConfigError(f"flag {key!r} has no configuration key")  # pragma: no cover - wiring bug
            values[key] = _check(value, hints[key], f"--{key.replace('_', '-')}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None


def environ() -> Mapping[str, str]:
    return os.environ


def read_config_file(path: str, what: str) -> bytes:
    """A file a config key names (token, TLS material, labels, era overrides); ValueError says which."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc.strerror}") from None


def read_era_overrides(path: str) -> tuple[EraOverride, ...]:
    """The era override table at `path` ('' for none). ValueError names an unreadable file,
    ParseError (also a ValueError) a malformed one."""
    if not path:
        return ()
    return load_era_overrides(read_config_file(path, "era override file").decode("utf-8", "replace"), path)
