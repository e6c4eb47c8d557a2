"""Dataclasses <-> JSON, driven by their type hints: Case, Expect, Observation.

The qemu backend sends whole cases to the guest (generated cases run there
unchanged) and reads observations back.  The same codec serves both ways:

* ``to_json(obj)``: a JSON-ready dict of every field (fields equal to their
  default are left out); bytes become hex strings, int dict keys become
  "0x..." strings, sets become sorted lists, nested dataclasses dicts.
* ``from_json(cls, data, strict=...)``: the inverse.  ``strict=True`` is for
  untrusted input (what a guest sends): unknown or missing keys, a value of
  the wrong type (a bool where an int belongs, NaN, an int outside
  [-2**63, 2**64)), a malformed hex string are a ``CodecError`` naming the
  field.  ``strict=False`` (the guest reading what the host sent) converts
  without checking.

Nothing is hard-coded per class: a field added to Case or Observation is
carried automatically, and a field of a type the codec does not know fails
loudly (``CodecError`` at the first encode or decode) instead of being lost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from .case import Case

INT_MIN, INT_LIMIT = -(1 << 63), 1 << 64  # VMCB fields are u64; params may be signed


class CodecError(ValueError):
    """Data that does not decode into the dataclass (message names the field)."""


Convert = Callable[[Any, str], Any]  # (value, where) -> converted value


# --------------------------------------------------------------------------
# encoding


def to_json(obj: Any) -> Any:
    """OBJ (a dataclass instance or a value of a supported type) as JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for name, has_default, default in _encoders(type(obj)):
            value = getattr(obj, name)
            if not (has_default and (value is default or value == default)):
                out[name] = _encode_value(value)
        return out
    return _encode_value(obj)


_PLAIN = frozenset({type(None), bool, int, float, str})


def _encode_value(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:  # the common case first: the guest encodes under TCG
        return value
    if kind is list and all(type(v) in _PLAIN for v in value):
        return value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value):
        return to_json(value)
    if isinstance(value, Mapping):
        return {_encode_key(k): _encode_value(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(_encode_value(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_encode_value(v) for v in value]
    raise CodecError(f"cannot encode {type(value).__name__} value {value!r}")


def _encode_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return hex(key)
    raise CodecError(f"cannot encode dict key {key!r}")


def _check_types(cls: type, seen: set[type]) -> None:
    """A CodecError now for a field type the codec cannot carry (nested too)."""
    if cls in seen:
        return
    seen.add(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        _converter(hints[f.name], f"{cls.__name__}.{f.name}", True)
        for inner in _nested_dataclasses(hints[f.name]):
            _check_types(inner, seen)


def _nested_dataclasses(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [d for arg in typing.get_args(tp) for d in _nested_dataclasses(arg)]


@functools.cache
def _encoders(cls: type) -> tuple[tuple[str, bool, Any], ...]:
    """(name, has a default, the default) per field; an unknown type fails here."""
    _check_types(cls, set())
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out.append((f.name, True, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            out.append((f.name, True, f.default_factory()))
        else:
            out.append((f.name, False, None))
    return tuple(out)


# --------------------------------------------------------------------------
# decoding


def from_json(cls: type, data: Any, *, strict: bool = True) -> Any:
    """An instance of the dataclass CLS from DATA (see the module docstring)."""
    return _dataclass_converter(cls, strict)(data, cls.__name__)


def decode_case(data: Any, *, strict: bool = True) -> Case:
    return from_json(Case, data, strict=strict)


def encode_case(case: Case) -> dict:
    return to_json(case)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # an annotation that does not resolve is a codec bug
        raise CodecError(f"cannot resolve the field types of {cls.__name__}: {e}") from None


@functools.cache
def _dataclass_converter(cls: type, strict: bool) -> Convert:
    _check_types(cls, set())
    hints = _hints(cls)
    fields = {f.name: (f, _converter(hints[f.name], f"{cls.__name__}.{f.name}", strict))
              for f in dataclasses.fields(cls) if f.init}
    required = {name for name, (f, _) in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    if not strict:
        # Trusted data (the host's cases, read in the guest): no per-field
        # location strings, no identity calls (interpreted under TCG).
        loose = {name: conv for name, (_, conv) in fields.items()}

        def convert_loose(value: Any, where: str) -> Any:
            kwargs = {}
            for key, item in value.items():
                conv = loose.get(key)
                if conv is None:
                    raise CodecError(f"{where}: unknown field {key!r}")
                kwargs[key] = item if conv is _identity else conv(item, where)
            return cls(**kwargs)

        return convert_loose

    def convert(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise CodecError(f"{where}: expected an object, got {_kind(value)}")
        if strict:
            unknown = set(value) - set(fields)
            if unknown:
                names = ", ".join(sorted(map(str, unknown)))
                raise CodecError(f"{where}: unknown field(s) {names}")
            missing = required - set(value)
            if missing:
                raise CodecError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        kwargs = {}
        for key, item in value.items():
            entry = fields.get(key)
            if entry is None:
                raise CodecError(f"{where}: unknown field {key!r}")
            kwargs[key] = entry[1](item, f"{where}.{key}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise CodecError(f"{where}: {e}") from None

    return convert


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _converter(tp: Any, where: str, strict: bool) -> Convert:
    """The converter for declared type TP (raises CodecError for unknown types)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1 or len(args) != 2:
            raise CodecError(f"{where}: unsupported union type {tp}")
        inner = _converter(options[0], where, strict)
        if inner is _identity:  # loose: None passes through as it is
            return inner
        return lambda v, w: None if v is None else inner(v, w)
    if tp is Any:
        return _any(strict)
    if dataclasses.is_dataclass(tp):
        # Looked up when used: a dataclass may contain itself (Expect.alternatives).
        return lambda v, w: _dataclass_converter(tp, strict)(v, w)
    if tp in _SCALARS:
        return _SCALARS[tp] if strict else _LOOSE.get(tp, _identity)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return _fixed_tuple([_converter(a, where, strict) for a in args], strict)
    if origin in (list, tuple, frozenset, set) and args:
        if origin is tuple and len(args) != 2:
            raise CodecError(f"{where}: unsupported tuple type {tp}")
        return _sequence(origin, _converter(args[0], where, strict), strict)
    if origin in (dict, Mapping) and len(args) == 2:
        if args[0] not in (str, int):
            raise CodecError(f"{where}: unsupported dict key type {args[0]}")
        return _mapping(args[0], _converter(args[1], where, strict), strict)
    raise CodecError(f"{where}: casecodec cannot carry a field of type {tp}")


def _identity(value: Any, where: str) -> Any:
    return value


def _int(value: Any, where: str) -> int:
    if type(value) is not int or not INT_MIN <= value < INT_LIMIT:
        raise CodecError(f"{where}: expected a 64-bit integer, got {_kind(value)}")
    return value


def _float(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise CodecError(f"{where}: expected a finite number, got {_kind(value)}")
    return float(value)


def _str(value: Any, where: str) -> str:
    if type(value) is not str:
        raise CodecError(f"{where}: expected a string, got {_kind(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise CodecError(f"{where}: expected true/false, got {_kind(value)}")
    return value


def _bytes(value: Any, where: str) -> bytes:
    if type(value) is not str:
        raise CodecError(f"{where}: expected a hex string, got {_kind(value)}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CodecError(f"{where}: not a hex string") from None


_SCALARS: dict[Any, Convert] = {int: _int, float: _float, str: _str, bool: _bool,
                                bytes: _bytes}
_LOOSE: dict[Any, Convert] = {bytes: lambda v, w: bytes.fromhex(v),
                              float: lambda v, w: float(v)}


def _sequence(kind: type, item: Convert, strict: bool) -> Convert:
    def convert(value: Any, where: str) -> Any:
        if type(value) is not list:
            raise CodecError(f"{where}: expected a list, got {_kind(value)}")
        return kind(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    def loose(value: Any, where: str) -> Any:
        return kind(item(v, where) for v in value)

    return convert if strict else loose


def _fixed_tuple(items: list[Convert], strict: bool) -> Convert:
    """tuple[A, B]: a list of exactly that many values, each of its own type."""

    def convert(value: Any, where: str) -> tuple:
        if type(value) is not list or len(value) != len(items):
            raise CodecError(f"{where}: expected a list of {len(items)}, got {_kind(value)}")
        pairs = enumerate(zip(items, value, strict=True))
        return tuple(item(v, f"{where}[{i}]") for i, (item, v) in pairs)

    def loose(value: Any, where: str) -> tuple:
        return tuple(item(v, where) for item, v in zip(items, value, strict=True))

    return convert if strict else loose


def _mapping(key_type: type, item: Convert, strict: bool) -> Convert:
    def key(k: str, where: str) -> Any:
        if key_type is str:
            return k
        if not k.startswith(("0x", "-0x")):
            raise CodecError(f"{where}: integer key {k!r} is not 0x-hex")
        try:
            return _int(int(k, 16), where) if strict else int(k, 16)
        except ValueError:
            raise CodecError(f"{where}: integer key {k!r} is not 0x-hex") from None

    def convert(value: Any, where: str) -> dict:
        if type(value) is not dict:
            raise CodecError(f"{where}: expected an object, got {_kind(value)}")
        return {key(k, where): item(v, f"{where}[{k}]") for k, v in value.items()}

    def loose(value: Any, where: str) -> dict:
        if key_type is str:
            return {k: item(v, where) for k, v in value.items()}
        return {int(k, 16): item(v, where) for k, v in value.items()}

    return convert if strict else loose


def _any(strict: bool) -> Convert:
    def convert(value: Any, where: str) -> Any:
        if strict:
            _check_plain(value, where)
        return value

    return convert


def _check_plain(value: Any, where: str) -> None:
    """Plain JSON data (for Any-typed fields): no NaN, ints in range."""
    if value is None or type(value) in (bool, str):
        return
    if type(value) is int:
        _int(value, where)
    elif type(value) is float:
        _float(value, where)
    elif type(value) is list:
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif type(value) is dict:
        for k, v in value.items():
            _check_plain(v, f"{where}[{k}]")
    else:
        raise CodecError(f"{where}: unexpected {_kind(value)}")
