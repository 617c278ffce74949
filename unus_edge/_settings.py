"""Generic settings loading: TOML files, environment variables and ``--set`` flags, coerced by annotation.

Private to :mod:`unus_edge.config`, which declares the settings dataclasses and validates the
loaded values; this module knows nothing about jobs or devices. A configuration class is a
frozen dataclass whose fields are *sections* (themselves frozen dataclasses of keys).

* **Precedence**, lowest first: defaults < the TOML file < environment variables
  ``UNUS_<SECTION>_<KEY>`` (and any aliases the caller names) < ``section.key=value`` flags.
* **Coercion by annotation**: ``str``, ``int`` (refusing ``bool``), ``float`` (finite),
  ``bool``, ``Literal[...]``, ``Mapping[str, Scalar]`` and unions of scalars. Values from the
  environment or flags are text and are parsed; values from TOML must already have the type.
* **Strict keys**: an unknown section or key, or a value of the wrong type, raises
  :class:`~unus_edge.errors.ConfigError` naming the dotted key. A section with an ``options``
  field is the exception: it collects its unknown keys there (strategy parameters).
"""

from __future__ import annotations

import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any, Literal, TypeVar, get_args, get_origin

from unus_edge._types import Scalar
from unus_edge.errors import ConfigError

__all__ = [
    "Scalar",
    "load_settings",
]


T = TypeVar("T")


def _coerce(key: str, value: Any, annotation: Any, *, from_text: bool) -> Any:
    """Check (or, for text from the environment or a flag, parse) one value."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if annotation is bool:
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(key, f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if from_text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if origin is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a table")
        return {str(k): _coerce(f"{key}.{k}", v, Scalar, from_text=from_text) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        if from_text and isinstance(value, str):
            return _parse_scalar(value)
        if isinstance(value, str | int | float | bool):
            return value
        raise ConfigError(key, f"must be a string, number or boolean, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")


def _parse_scalar(text: str) -> Scalar:
    """Strategy options given as text (environment, flags) have no declared type: guess it."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("inf", "infinity", "nan", "-inf"):
        return lowered  # words, not floats: "inf" is the SSP bound's infinity
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _section(cls: type[T], name: str, table: Mapping[str, Any], *, from_text: bool = False) -> T:
    """Build one section; a section with an ``options`` field collects its unknown keys there."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known or key == "options":
            if "options" in known:
                extras[key] = value
                continue
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        values[key] = _coerce(f"{name}.{key}", value, hints[key], from_text=from_text)
    if extras:
        values["options"] = _coerce(f"{name}", extras, hints["options"], from_text=from_text)
    return cls(**values)


def _read_toml(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", f"{os.fspath(path)} does not exist") from None
    except OSError as error:
        raise ConfigError("--config", f"cannot read {os.fspath(path)}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("--config", f"{os.fspath(path)} is not valid TOML: {error}") from error


def _overrides(
    sections: Mapping[str, type],
    environ: Mapping[str, str],
    assignments: Sequence[str],
    aliases: Mapping[str, str],
) -> dict[str, dict[str, str]]:
    """Text overrides from ``UNUS_<SECTION>_<KEY>`` variables, then ``section.key=value`` flags.

    ``aliases`` maps more variables to dotted keys; one applies when it is non-empty, its key's
    section exists and the key's own variable is not set.
    """
    found: dict[str, dict[str, str]] = {}
    for section, cls in sections.items():
        for item in fields(cls):
            variable = f"UNUS_{section}_{item.name}".upper()
            if variable in environ:
                found.setdefault(section, {})[item.name] = environ[variable]
    for alias, dotted in aliases.items():
        section, _, name = dotted.partition(".")
        if section in sections and environ.get(alias) and f"UNUS_{section}_{name}".upper() not in environ:
            found.setdefault(section, {})[name] = environ[alias]
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        if not separator or not dot or section not in sections:
            raise ConfigError(key or assignment, f"overrides look like section.key=value with a section among "
                                                 f"{', '.join(sections)}; got {assignment!r}")
        found.setdefault(section, {})[name] = value
    return found


def load_settings(
    cls: type[T],
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None,
    assignments: Sequence[str],
    *,
    aliases: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from defaults, the TOML file at ``path``, ``environ`` (``None``: the process
    environment) and ``section.key=value`` ``assignments``, in increasing precedence.

    Types and key names are checked here; range checks are the caller's.
    """
    document = _read_toml(path)
    sections = {f.name: typing.get_type_hints(cls)[f.name] for f in fields(cls)}  # type: ignore[arg-type]
    for name in document:
        if name not in sections:
            raise ConfigError(name, f"unknown section (known: {', '.join(sections)})")
    overrides = _overrides(sections, os.environ if environ is None else environ, assignments, aliases or {})
    built: dict[str, Any] = {}
    for name, section_cls in sections.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(name, "must be a table ([section])")
        value = _section(section_cls, name, table)
        if name in overrides:
            text_values = _section(section_cls, name, overrides[name], from_text=True)
            known = {f.name for f in fields(section_cls)}
            changed = {key: getattr(text_values, key) for key in overrides[name] if key in known}
            if "options" in known:  # options from the text merge into those of the file
                changed["options"] = {**value.options, **text_values.options}
            value = replace(value, **changed)
        built[name] = value
    return cls(**built)


