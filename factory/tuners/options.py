"""Typed tuner options: every tuner declares its config keys as a dataclass, validated when the config is composed.

    @dataclass(frozen=True)
    class LoraOptions:
        r: int = 128
        target_modules: Optional[Union[str, List[str]]] = None

        def check(self, tuner: str) -> None:   # optional: value ranges (in_range, one_of)
            ...

`parse_options(LoraOptions, {"r": 8}, "lora")` returns `LoraOptions(r=8, ...)`. A key the dataclass does not
declare (`tuner.rnak=2`) or a value of the wrong type (`tuner.r=abc`) is one FactoryError naming the key, the value
and the accepted keys, raised before any model is built (factory.config_checks calls `validate_tuner_options`).
Ints are accepted where a float is declared; bools are never accepted as numbers; a lone string is accepted where
a list of strings is declared and becomes a one-element list.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from factory.errors import FactoryError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a tuner that takes none (frozen, full)."""


def option_error(tuner: str, key: str, value: Any, expected: str) -> FactoryError:
    return FactoryError(
        f"tuner.{key}={value!r} is not valid for the {tuner!r} tuner: it must be {expected}. Fix the override on "
        f"the command line or configs/tuner/{tuner}.yaml."
    )


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, List, tuple, Tuple):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'values') if args else 'values'}"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


_NO_MATCH = object()


def _coerce(hint: Any, value: Any) -> Any:
    """`value` as an instance of the type `hint`, or _NO_MATCH."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            coerced = _coerce(arg, value)
            if coerced is not _NO_MATCH:
                return coerced
        return _NO_MATCH
    if origin in (list, List):
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            return [value]
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        items = [_coerce(item, v) for v in value]
        return _NO_MATCH if any(i is _NO_MATCH for i in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO_MATCH
    if hint is str:
        return value if isinstance(value, str) else _NO_MATCH
    raise TypeError(f"tuner options cannot declare fields of type {hint!r}")  # a programming error in a tuner


def option_keys(options_type: type) -> List[str]:
    return [f.name for f in dataclasses.fields(options_type)]


def parse_options(options_type: Type[T], values: Mapping[str, Any], tuner: str, prefix: str = "") -> T:
    """An `options_type` instance from the config mapping `values` (without `name`), validated. `prefix` names a
    nested node in messages (e.g. "vision_lora." for tuner.vision_lora.r)."""
    values = dict(values)
    values.pop("name", None)
    keys = option_keys(options_type)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise FactoryError(
            f"The {tuner!r} tuner config{f' node tuner.{prefix[:-1]}' if prefix else ''} has unknown key(s) {unknown}. "
            f"Accepted keys: {', '.join(keys) or '(none)'}. "
            f"Fix the override or configs/tuner/{tuner}.yaml."
        )
    hints = typing.get_type_hints(options_type)
    parsed = {}
    for key, value in values.items():
        coerced = _coerce(hints[key], value)
        if coerced is _NO_MATCH:
            raise option_error(tuner, prefix + key, value, _describe(hints[key]))
        parsed[key] = coerced
    options = options_type(**parsed)
    check = getattr(options, "check", None)
    if check is not None:
        check(tuner)
    return options


def in_range(tuner: str, key: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
             high_open: bool = False) -> None:
    """FactoryError unless low <= value <= high (value < high when high_open)."""
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bounds = [f">= {low}" if low is not None else "", (f"< {high}" if high_open else f"<= {high}") if high is not
                  None else ""]
        raise option_error(tuner, key, value, " and ".join(b for b in bounds if b))


def one_of(tuner: str, key: str, value: str, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise option_error(tuner, key, value, "one of " + ", ".join(choices))
