"""Checks on single settings, each failing with one sentence: the setting, the bad value, the fix.

Every check returns the value it accepted, so a caller may write ``rank = require_positive_int("rank", rank)``.
``True`` and ``False`` are never numbers here, even though Python counts them as ints.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from deltatune.errors import DeltatuneError


def require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeltatuneError(f"{name} must be a whole number of at least {minimum}, got {value!r}: fix the config")
    return value


def require_positive_int(name: str, value: Any) -> int:
    return require_int(name, value, minimum=1)


MAX_SIZE = 2**20  # a tensor dimension beyond this (a rank, a hidden size) is no real adapter's: a typo


def require_size(name: str, value: Any) -> int:
    """A tensor dimension a method allocates (rank, virtual tokens, hidden size): 1 to ``MAX_SIZE``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise DeltatuneError(f"{name} must be a whole number of at least 1 and at most {MAX_SIZE:,}, got {value!r}: "
                             "fix the config")
    return value


def require_optional_text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise DeltatuneError(f"{name} must be text, got {value!r}: fix the config")
    return value


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


def require_names(name: str, value: Any) -> tuple[str, ...]:
    """A list of non-empty strings (module names, say), as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(item, str) and item for item in value):
        raise DeltatuneError(f"{name} must be a list of names like [q_proj, v_proj], got {value!r}: fix the config")
    return tuple(value)


def require_regex(name: str, value: Any) -> str:
    """A string that compiles as a regular expression."""
    if not isinstance(value, str):
        raise DeltatuneError(f"{name} must be a regular expression (text), got {value!r}: fix the config")
    try:
        re.compile(value)
    except re.error as error:
        raise DeltatuneError(f"{name} {value!r} is not a valid regular expression ({error}): fix the config") from None
    return value


def require_targets(name: str, value: Any) -> str | tuple[str, ...]:
    """Modules to adapt as peft reads them: "all-linear", one regex over the whole path, or a
    non-empty list of names."""
    if isinstance(value, str):
        return require_regex(name, value)
    names = require_names(name, value)
    if not names:
        raise DeltatuneError(f"{name} is an empty list, so nothing would be adapted: name at least one module, "
                             "like [q_proj, v_proj], or use all-linear")
    return names


def require_mapping(name: str, value: Any, check_value: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A mapping of regex keys (peft's rank_pattern, alpha_pattern) to values that pass ``check_value``."""
    if not isinstance(value, Mapping):
        raise DeltatuneError(f"{name} must map module names to values like {{q_proj: 4}}, got {value!r}: fix the config")
    for key, item in value.items():
        require_regex(f"{name} key", key)
        check_value(f"{name}[{key!r}]", item)
    return dict(value)


def require_writable_path(name: str, path: str | os.PathLike, folder: bool = False) -> Path:
    """Where ``name`` (``--output``, ``--json``) will be written, checked before any work is done: a
    file is not a folder (nor a folder a file), and the nearest folder that exists is one this
    user may write into (it will hold the new files and folders)."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        wanted, found = ("folder", "a file") if folder else ("file", "a folder")
        raise DeltatuneError(f"{name} {str(target)!r} is {found}; name a {wanted} to write.")
    nearest = next(p for p in ((target,) if folder else ()) + (target.parent, *target.parent.parents) if p.exists())
    if not nearest.is_dir():
        raise DeltatuneError(f"{name} {str(target)!r} cannot be written: {str(nearest)!r} is a file, not a folder; "
                             "choose another path.")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise DeltatuneError(f"{name} {str(target)!r} cannot be written: you may not write into {str(nearest)!r}; "
                             "choose a folder you can write to.")
    return target
