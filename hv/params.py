"""Checked arguments of control commands.

Every command argument comes from a client and is checked for type and range
before anything starts; a bad one raises ParameterError naming it, in the
words QEMU uses ("Parameter 'downtime_ms' expects a number from 1 to
2000000"). JSON booleans are never taken as numbers, NaN and infinities are
never numbers, and strings are never taken as booleans.
"""

from __future__ import annotations

import math

from .errors import HvError

_MISSING = object()


class ParameterError(HvError):
    """A command argument has the wrong type or lies out of range."""


def _expects(name: str, what: str) -> ParameterError:
    return ParameterError(f"Parameter '{name}' expects {what}")


def number(name: str, value, lo: float, hi: float, *, integer: bool = False) -> float | int:
    """value as a number in [lo, hi] (an int when integer)."""
    kind = "an integer" if integer else "a number"
    what = f"{kind} from {lo:g} to {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expects(name, what)
    if isinstance(value, float):
        if not math.isfinite(value) or (integer and not value.is_integer()):
            raise _expects(name, what)
        if integer:
            value = int(value)
    if not lo <= value <= hi:
        raise _expects(name, what)
    return value


def integer(name: str, value, lo: int, hi: int) -> int:
    return int(number(name, value, lo, hi, integer=True))


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise _expects(name, "true or false")
    return value


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _expects(name, "one of " + ", ".join(f'"{c}"' for c in choices))
    return value


def string(name: str, value) -> str:
    if not isinstance(value, str):
        raise _expects(name, "a string")
    return value


def take(args: dict, name: str, check, *extra, default=_MISSING):
    """args[name] checked by check(name, value, *extra); default when absent
    (ParameterError "is missing" when there is no default)."""
    if name not in args:
        if default is _MISSING:
            raise ParameterError(f"Parameter '{name}' is missing")
        return default
    return check(name, args[name], *extra)


def refuse_unknown(command: str, args: dict, known) -> None:
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ParameterError(f"{command}: unknown argument{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(u) for u in unknown)}; known: "
                             f"{', '.join(sorted(known))}")
