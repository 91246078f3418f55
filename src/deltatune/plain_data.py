"""JSON/YAML-ready copies of settings: tuples become lists, mappings dicts with text keys."""

from __future__ import annotations

from typing import Any, Mapping


def plain_data(value: Any) -> Any:
    """JSON/YAML-ready: tuples to lists, mappings to dicts with text keys."""
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value
