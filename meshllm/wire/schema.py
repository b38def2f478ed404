"""Field kinds: what a message field may hold, and how it travels as CBOR.

A message class annotates each field with ``Annotated[<python type>, <kind>]``. The kind
checks a value when the message is built (so a message object that exists is valid, whether a
caller built it or the decoder did), turns it into plain CBOR data (``to_wire``) and back
(``from_wire``). ``from_wire`` is strict about the CBOR type (an int is never accepted where a
float is expected, and so on): only the exact form :func:`meshllm.wire.encode` writes decodes,
which keeps ``encode(decode(frame)) == frame`` true for every frame that decodes.

Every failure raises :class:`~meshllm.errors.WireError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import typing
from dataclasses import dataclass
from typing import Any, Protocol

from meshllm.errors import WireError

U63_MAX = 2**63 - 1


class Kind(Protocol):
    """What one field holds: a check for Python values and a mapping to and from CBOR data."""

    def check(self, value: object, where: str) -> object:
        """Return ``value`` (normalised, e.g. int -> float) or raise WireError."""

    def to_wire(self, value: Any) -> object:
        """Plain CBOR data for an already checked value."""

    def from_wire(self, raw: object, where: str) -> object:
        """The Python value for decoded CBOR data; the field's ``check`` still runs after."""


def _type_name(value: object) -> str:
    return type(value).__name__


@dataclass(frozen=True)
class UInt:
    """An integer in ``[min_value, max_value]`` (non-negative by default)."""

    max_value: int = U63_MAX
    min_value: int = 0

    def check(self, value: object, where: str) -> int:
        if isinstance(value, bool):
            raise WireError(f"{where}: expected an integer, got bool")
        try:
            number = operator.index(value)  # int, numpy integers
        except TypeError:
            raise WireError(f"{where}: expected an integer, got {_type_name(value)}") from None
        if not self.min_value <= number <= self.max_value:
            raise WireError(
                f"{where}: {number} is out of range [{self.min_value}, {self.max_value}]"
            )
        return number

    def to_wire(self, value: int) -> int:
        return value

    def from_wire(self, raw: object, where: str) -> object:
        if type(raw) is not int:
            raise WireError(f"{where}: expected an integer, got {_type_name(raw)}")
        return raw


@dataclass(frozen=True)
class Float:
    """A finite float in ``[min_value, max_value]``; travels as a CBOR double."""

    min_value: float = -math.inf
    max_value: float = math.inf

    def check(self, value: object, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise WireError(f"{where}: expected a number, got {_type_name(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise WireError(f"{where}: {number} is not finite")
        if not self.min_value <= number <= self.max_value:
            raise WireError(
                f"{where}: {number} is out of range [{self.min_value}, {self.max_value}]"
            )
        return number

    def to_wire(self, value: float) -> float:
        return value

    def from_wire(self, raw: object, where: str) -> object:
        if type(raw) is not float:
            raise WireError(f"{where}: expected a float, got {_type_name(raw)}")
        return raw


@dataclass(frozen=True)
class Bool:
    """``True`` or ``False``."""

    def check(self, value: object, where: str) -> bool:
        if type(value) is not bool:
            raise WireError(f"{where}: expected a bool, got {_type_name(value)}")
        return value

    def to_wire(self, value: bool) -> bool:
        return value

    def from_wire(self, raw: object, where: str) -> object:
        return self.check(raw, where)


@dataclass(frozen=True)
class Text:
    """A printable string (no control characters) of ``min_len..max_len`` characters,
    optionally one of ``choices``."""

    max_len: int
    min_len: int = 0
    choices: tuple[str, ...] = ()

    def check(self, value: object, where: str) -> str:
        if type(value) is not str:
            raise WireError(f"{where}: expected a string, got {_type_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise WireError(
                f"{where}: string of {len(value)} characters; allowed {self.min_len}..{self.max_len}"
            )
        if not value.isprintable():
            raise WireError(f"{where}: string contains control or unprintable characters")
        if self.choices and value not in self.choices:
            raise WireError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
        return value

    def to_wire(self, value: str) -> str:
        return value

    def from_wire(self, raw: object, where: str) -> object:
        if type(raw) is not str:
            raise WireError(f"{where}: expected a string, got {_type_name(raw)}")
        return raw


@dataclass(frozen=True)
class Bytes:
    """A byte string of at most ``max_len`` bytes (bytearray/memoryview become bytes)."""

    max_len: int

    def check(self, value: object, where: str) -> bytes:
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if type(value) is not bytes:
            raise WireError(f"{where}: expected bytes, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise WireError(f"{where}: {len(value)} bytes; at most {self.max_len} allowed")
        return value

    def to_wire(self, value: bytes) -> bytes:
        return value

    def from_wire(self, raw: object, where: str) -> object:
        if type(raw) is not bytes:
            raise WireError(f"{where}: expected bytes, got {_type_name(raw)}")
        return raw


@dataclass(frozen=True)
class TupleOf:
    """A tuple of ``min_len..max_len`` items of one kind; travels as a CBOR array.
    A list is accepted when building a message and stored as a tuple."""

    item: Kind
    max_len: int
    min_len: int = 0

    def check(self, value: object, where: str) -> tuple[object, ...]:
        if not isinstance(value, (tuple, list)):
            raise WireError(f"{where}: expected a tuple, got {_type_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise WireError(
                f"{where}: {len(value)} items; allowed {self.min_len}..{self.max_len}"
            )
        return tuple(self.item.check(item, f"{where}[{i}]") for i, item in enumerate(value))

    def to_wire(self, value: tuple[object, ...]) -> list[object]:
        return [self.item.to_wire(item) for item in value]

    def from_wire(self, raw: object, where: str) -> object:
        if type(raw) is not list:
            raise WireError(f"{where}: expected an array, got {_type_name(raw)}")
        if not self.min_len <= len(raw) <= self.max_len:
            raise WireError(f"{where}: {len(raw)} items; allowed {self.min_len}..{self.max_len}")
        return tuple(self.item.from_wire(item, f"{where}[{i}]") for i, item in enumerate(raw))


@dataclass(frozen=True)
class Struct:
    """A nested :class:`WireStruct` dataclass; travels as a CBOR array of its fields in order."""

    cls: type[WireStruct]

    def check(self, value: object, where: str) -> object:
        if type(value) is not self.cls:
            raise WireError(f"{where}: expected {self.cls.__name__}, got {_type_name(value)}")
        return value

    def to_wire(self, value: WireStruct) -> list[object]:
        return struct_to_wire(value)

    def from_wire(self, raw: object, where: str) -> object:
        if type(raw) is not list:
            raise WireError(f"{where}: expected an array, got {_type_name(raw)}")
        return struct_from_wire(self.cls, raw)


class WireStruct:
    """Base of every message and nested wire value: checks all fields when built.

    Subclasses are ``@dataclass(frozen=True)`` with ``Annotated[type, kind]`` fields, and may
    define ``_check_invariants(self)`` for rules that span fields (it raises WireError).
    """

    def __post_init__(self) -> None:
        cls_name = type(self).__name__
        for name, kind in field_kinds(type(self)):
            value = getattr(self, name)
            checked = kind.check(value, f"{cls_name}.{name}")
            if checked is not value:
                object.__setattr__(self, name, checked)
        self._check_invariants()

    def _check_invariants(self) -> None:
        """Cross-field rules; none by default."""


@functools.cache
def field_kinds(cls: type[WireStruct]) -> tuple[tuple[str, Kind], ...]:
    """The (name, kind) of each field of a wire dataclass, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    kinds = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[field.name]
        kind = next((m for m in getattr(hint, "__metadata__", ()) if hasattr(m, "to_wire")), None)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no wire kind in its annotation")
        kinds.append((field.name, kind))
    return tuple(kinds)


def struct_to_wire(value: WireStruct) -> list[object]:
    """The CBOR array of a wire dataclass's fields, in declaration order."""
    return [kind.to_wire(getattr(value, name)) for name, kind in field_kinds(type(value))]


def struct_from_wire(cls: type[WireStruct], raw: list[object]) -> WireStruct:
    """Build ``cls`` from the CBOR array of its fields; WireError on any mismatch."""
    kinds = field_kinds(cls)
    if len(raw) != len(kinds):
        raise WireError(f"{cls.__name__}: expected {len(kinds)} fields, got {len(raw)}")
    values = [
        kind.from_wire(item, f"{cls.__name__}.{name}") for (name, kind), item in zip(kinds, raw)
    ]
    return cls(*values)
