"""Checks on single settings, each failing with one sentence: the setting, the bad value, the fix.

Every check returns the value it accepted, so a caller may write ``rank = require_positive_int("rank", rank)``.
``True`` and ``False`` are never numbers here, even though Python counts them as ints.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from deltatune.errors import DeltatuneError


def require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeltatuneError(f"{name} must be a whole number of at least {minimum}, got {value!r}: fix the config")
    return value


def require_positive_int(name: str, value: Any) -> int:
    return require_int(name, value, minimum=1)


def require_number(name: str, value: Any, minimum: float | None = None, below: float | None = None) -> float:
    """A finite int or float with ``minimum <= value < below`` (either bound may be left out)."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or (minimum is not None and value < minimum) or (below is not None and value >= below):
        raise DeltatuneError(f"{name} must be {_number_range(minimum, below)}, got {value!r}: fix the config")
    return value


def require_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise DeltatuneError(f"{name} {value!r} is unknown: use one of {', '.join(map(str, choices))}")
    return value


def require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DeltatuneError(f"{name} must be true or false, got {value!r}: fix the config")
    return value


def _number_range(minimum: float | None, below: float | None) -> str:
    if minimum is not None and below is not None:
        return f"a number of at least {minimum} and below {below}"
    if minimum is not None:
        return f"a number of at least {minimum}"
    if below is not None:
        return f"a number below {below}"
    return "a finite number"
