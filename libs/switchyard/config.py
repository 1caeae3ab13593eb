"""Typed service configuration: one dataclass per service, read from flags and env vars.

Each field of a service's config dataclass becomes a `--flag-name` and a
`SWITCHYARD_FLAG_NAME` environment variable (flags win over env, env over defaults). Field
`metadata={"help": ...}` becomes the flag's help. `validate()` runs at start-up so a bad
value stops the service with a message instead of failing later.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

T = TypeVar("T")

ENV_PREFIX = "SWITCHYARD_"


class ConfigError(ValueError):
    """A configuration value is missing or out of range."""


def _base_type(annotation: Any) -> Any:
    """The concrete type of a field, unwrapping `X | None` and `Optional[X]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return annotation


def _coerce(raw: str, kind: Any, name: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw)
        if typing.get_origin(kind) in (list, tuple):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from exc


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def load_config(cls: type[T], argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                **overrides: Any) -> T:
    """Build `cls` from flags (argv), env vars (`environ`, default os.environ) and keyword
    overrides, then validate it."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=cls.__name__, description=cls.__doc__)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        parser.add_argument(flag_name(f.name), dest=f.name, default=None,
                            help=f"{f.metadata.get('help', '')} (env {env_name(f.name)})")
    args = parser.parse_args(list(argv) if argv is not None else [])
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = _base_type(hints[f.name])
        if f.name in overrides and overrides[f.name] is not None:
            values[f.name] = overrides[f.name]
            continue
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is not None:
            values[f.name] = _coerce(raw, kind, f.name)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
