"""Validation of the front ends' constructor options: one rule per kind of option, one way of saying what is wrong.

Every check raises :class:`OptionError` (a :class:`ValueError`) whose message names the option, the value given
and the values accepted, e.g. ``tolerance must be a fraction in (0, 1) (0.1 means 10 %), got 10``. A ``bool`` is
never taken for a number (``window=True``), and a float that is not finite never passes a numeric check.

Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "OptionError",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_patterns",
    "check_path",
    "check_name",
]


class OptionError(ValueError):
    """An option of ``SMDCallback``, ``SMDMonitor`` or ``DiagnosticsConfig`` out of its accepted values."""


def _is_bool(value: Any) -> bool:
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))  # numpy's, unimported


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (a numpy bool too); anything else (``"no"``, ``1``, ``None``) is an
    error: a truthy string would silently mean ``True``."""
    if not _is_bool(value):
        raise OptionError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as an ``int`` if it is an integer (not a bool, not a float such as ``2.5`` or ``2.0``) ``>= minimum``."""
    if value is None and allow_none:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Integral) or value < minimum:
        accepted = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise OptionError(f"{name} must be {accepted}{hint}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = True,
    high_open: bool = True,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """``value`` as a ``float`` if it is a finite real number (not a bool, not a string) in the interval from ``low``
    to ``high`` (open or closed at each end; ``high=math.inf``: no upper bound)."""
    if value is None and allow_none:
        return None
    ok = not _is_bool(value) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        if math.isinf(high):
            accepted = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            accepted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise OptionError(f"{name} must be {accepted}{' or None' if allow_none else ''}{hint}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (of the same type: ``True`` is not ``1``)."""
    options = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in options):
        raise OptionError(f"{name} must be one of {', '.join(repr(c) for c in options)}, got {value!r}")
    return value


def check_patterns(name: str, value: Any) -> list[str]:
    """Parameter-name globs: ``None`` (none), one string (one pattern: ``include="conv1.weight"`` is the pattern
    ``conv1.weight``, not 12 one-character patterns), or an iterable of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, bytes) or not isinstance(value, Iterable):
        raise OptionError(f"{name} must be a parameter-name glob (a str) or a list of them, got {value!r}")
    out = list(value)
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise OptionError(f"{name} must hold parameter-name globs (strings) only, got {bad[0]!r} in {out!r}")
    return out


def check_path(name: str, value: Any) -> Any:
    """A file path option: a non-empty ``str`` or ``os.PathLike``, ``True``/``None`` (the default place) or ``False``
    (none)."""
    if value is None or _is_bool(value):
        return value if value is None else bool(value)
    if isinstance(value, (str, os.PathLike)) and os.fspath(value) not in ("", b""):
        return value
    raise OptionError(f"{name} must be a path (a non-empty str or os.PathLike), True or None (the default place) or False (none), got {value!r}")


#: What a front end's ``name`` may hold: safe in metric keys of every logger and in file names.
_LABEL = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_name(name: Any) -> str | None:
    """``name`` if it is None or a label of letters, digits, ``_``, ``.`` and ``-`` (up to 64): an SMDCallback's
    label, which goes into its metric keys (``smd-<name>/…``) and its summary's file name."""
    if name is not None and (not isinstance(name, str) or not _LABEL.fullmatch(name)):
        raise OptionError(f"name must be a short label of letters, digits, '_', '.' and '-', got {name!r}")
    return name
