"""The machinery under every protocol message: the :class:`Message` base and annotation-driven decoding.

Private to :mod:`unus_edge.messages`, which declares the message classes (and re-exports
:class:`Message`). A message class is a frozen dataclass deriving from :class:`Message`; this
module turns an envelope into one by walking the class's type annotations, once per class
(cached), and checking every body value against them:

* ``str``, ``int``, ``float``, ``bool`` (``int`` refuses ``bool``; ``float`` accepts integers and
  refuses NaN and infinities), ``Literal[...]``, ``X | None``;
* ``tuple[X, ...]`` from a list, ``Mapping[str, X]`` from a map (at most 10 000 entries each).

A missing required field or a value of the wrong type raises
:class:`~unus_edge.errors.MessageError` (``missing_field`` / ``bad_field``); an annotation this
module cannot check is a bug in the class and raises :class:`TypeError`.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, ClassVar, Literal, Self, get_args, get_origin

from unus_edge.codec import Envelope, Tensor
from unus_edge.errors import MessageError

__all__ = [
    "Message",
    "check_field",
]

_MAX_MAP_ENTRIES = 10_000


class Message:
    """Base of every message: ``KIND`` names it in the envelope."""

    KIND: ClassVar[str]
    _validators: ClassVar[tuple[tuple[str, Any, bool], ...]]

    def validate(self) -> None:
        """Cross-field checks; raise ``MessageError("bad_field", ..., field=...)``."""

    def body(self) -> dict[str, Any]:
        """The envelope body: every field except ``tensors``."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
                if f.name != "tensors"}

    def tensors_or_empty(self) -> Mapping[str, Tensor]:
        tensors: Mapping[str, Tensor] = getattr(self, "tensors", {})
        return tensors

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> Self:
        if envelope.kind != cls.KIND:
            raise MessageError("unexpected_kind", f"expected {cls.KIND!r}, got {envelope.kind!r}", kind=envelope.kind)
        values: dict[str, Any] = {}
        for name, annotation, required in _validators_of(cls):
            if name == "tensors":
                values[name] = envelope.tensors
                continue
            if name not in envelope.body:
                if required:
                    raise MessageError("missing_field", "required", kind=cls.KIND, field=name)
                continue
            values[name] = _coerce(envelope.body[name], annotation, cls.KIND, name)
        if "tensors" not in values and envelope.tensors:
            raise MessageError("bad_field", "this kind carries no tensors", kind=cls.KIND, field="tensors")
        message = cls(**values)
        message.validate()
        return message


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _validators_of(cls: type[Message]) -> tuple[tuple[str, Any, bool], ...]:
    cached = cls.__dict__.get("_validators")
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = tuple(
            (f.name, hints[f.name], f.default is MISSING and f.default_factory is MISSING)
            for f in fields(cls)  # type: ignore[arg-type]
        )
        cls._validators = cached
    return cached


def _coerce(value: Any, annotation: Any, kind: str, name: str) -> Any:
    origin = get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in get_args(annotation):
            return None
        options = [a for a in get_args(annotation) if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, kind, name)
            except MessageError as error:
                errors.append(error.detail)
        raise MessageError("bad_field", " or ".join(errors), kind=kind, field=name)
    if origin is Literal:
        if value not in get_args(annotation) or type(value) is bool:
            raise MessageError("bad_field", f"{value!r} is not one of {get_args(annotation)}", kind=kind, field=name)
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise MessageError("bad_field", f"expected text, got {type(value).__name__}", kind=kind, field=name)
        return value
    if annotation is bool:
        if type(value) is not bool:
            raise MessageError("bad_field", f"expected a boolean, got {type(value).__name__}", kind=kind, field=name)
        return value
    if annotation is int:
        if type(value) is not int:
            raise MessageError("bad_field", f"expected an integer, got {type(value).__name__}", kind=kind, field=name)
        return value
    if annotation is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise MessageError("bad_field", f"expected a finite number, got {value!r}", kind=kind, field=name)
        return float(value)
    if origin is tuple:
        item_type = get_args(annotation)[0]
        if not isinstance(value, list) or len(value) > _MAX_MAP_ENTRIES:
            raise MessageError("bad_field", "expected a list", kind=kind, field=name)
        return tuple(_coerce(item, item_type, kind, name) for item in value)
    if origin in (Mapping, dict):
        item_type = get_args(annotation)[1]
        if not isinstance(value, dict) or len(value) > _MAX_MAP_ENTRIES:
            raise MessageError("bad_field", "expected a map", kind=kind, field=name)
        return {key: _coerce(item, item_type, kind, f"{name}.{key}") for key, item in value.items()}
    raise TypeError(f"{kind}.{name}: unsupported annotation {annotation!r}")  # a bug in a class, not input


def check_field(condition: bool, kind: str, name: str, detail: str) -> None:
    """For ``validate`` methods: raise ``MessageError("bad_field")`` naming the field unless ``condition``."""
    if not condition:
        raise MessageError("bad_field", detail, kind=kind, field=name)
