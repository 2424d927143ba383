"""Typed construction of dataclasses from plain JSON data read from a file.

A saved file's header is untrusted: every value is checked against the field's annotation
before a dataclass is built from it (``bool`` is not taken for ``int``, ``int`` is for
``float``; tuples and lists are rebuilt element by element; unknown keys are errors). The
dataclass's own ``__post_init__`` then checks the ranges.

    >>> from ouromamba_fx.config import WeightQuant
    >>> from_plain(WeightQuant, {"bits": 4}, "weight")
    WeightQuant(bits=4, granularity='per_channel', symmetric=True, method='lp_clip', p=2.4, candidates=100, min_ratio=0.5)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

MAX_ITEMS = 100_000  # longest list / dict / string accepted in a plain-data field


class PlainDataError(ValueError):
    """A value read from a file does not have the type its field declares."""


def _fail(where: str, want: str, v) -> PlainDataError:
    return PlainDataError(f"{where}: expected {want}, got {type(v).__name__} {str(v)[:60]!r}")


def _scalar(tp, v, where: str):
    if tp is bool:
        if type(v) is not bool:
            raise _fail(where, "true/false", v)
        return v
    if tp is int:
        if type(v) is not int:
            raise _fail(where, "an integer", v)
        return v
    if tp is float:
        if type(v) not in (int, float):
            raise _fail(where, "a number", v)
        return float(v)
    if tp is str:
        if type(v) is not str or len(v) > MAX_ITEMS:
            raise _fail(where, "a string", v)
        return v
    raise _fail(where, getattr(tp, "__name__", str(tp)), v)


def convert_value(tp, v, where: str):
    """``v`` as a value of annotation ``tp`` (scalars, ``X | None``, tuples, lists, dicts of str
    keys, nested dataclasses); :class:`PlainDataError` if it is not one."""
    if tp is typing.Any:
        return _json_value(v, where, 0)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return convert_value(a, v, where)
            except PlainDataError as e:
                errors.append(str(e))
        raise PlainDataError(errors[0] if len(errors) == 1 else f"{where}: none of {options} fits {str(v)[:60]!r}")
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, v, where)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(v, (list, tuple)) or len(v) > MAX_ITEMS:
            raise _fail(where, "a list", v)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(v):
                raise _fail(where, f"a list of {len(args)} items", v)
            return tuple(convert_value(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        item = args[0] if args else _json_scalar
        out = [convert_value(item, x, f"{where}[{i}]") for i, x in enumerate(v)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(v, dict) or len(v) > MAX_ITEMS:
            raise _fail(where, "an object", v)
        item = args[1] if args else _json_scalar
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _fail(where, "string keys", k)
            out[k] = convert_value(item, x, f"{where}[{k!r}]")
        return out
    if tp is _json_scalar:
        if v is None or type(v) in (bool, int, float, str):
            return _scalar(type(v), v, where) if v is not None else None
        raise _fail(where, "a number, string, true/false or null", v)
    return _scalar(tp, v, where)


def _json_value(v, where: str, depth: int):
    """Any JSON value (``typing.Any`` fields), nested at most 8 deep; checked, not interpreted."""
    if depth > 8:
        raise _fail(where, "a value nested at most 8 deep", v)
    if isinstance(v, (list, tuple)):
        if len(v) > MAX_ITEMS:
            raise _fail(where, "a shorter list", v)
        return [_json_value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
    if isinstance(v, dict):
        if len(v) > MAX_ITEMS or not all(type(k) is str for k in v):
            raise _fail(where, "an object with string keys", v)
        return {k: _json_value(x, f"{where}[{k!r}]", depth + 1) for k, x in v.items()}
    return convert_value(_json_scalar, v, where)


class _json_scalar:  # noqa: N801 - a marker type: any JSON scalar
    pass


def from_plain(cls, data, where: str | None = None):
    """Build dataclass ``cls`` from a JSON object, checking every field's type; fields left out
    take their defaults. Errors (:class:`PlainDataError`) name the field."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise _fail(where, "an object", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlainDataError(f"{where}: unknown fields {[str(k)[:40] for k in unknown[:5]]}")
    kwargs = {k: convert_value(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PlainDataError(f"{where}: {e}") from None


def finite_number(v, where: str, lo: float = -math.inf) -> float:
    """A finite number ``>= lo`` (or an error naming ``where``)."""
    if type(v) not in (int, float) or not math.isfinite(v) or v < lo:
        raise _fail(where, f"a finite number >= {lo}", v)
    return float(v)
