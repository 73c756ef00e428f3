"""Values as MLflow takes them: nested dicts as dotted params of bounded length, JSON text."""

from __future__ import annotations

import json
from typing import Any

# MLflow caps a param value at 6000 characters; ours are short, but a long URI should not crash
_MAX_PARAM = 6000


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:_MAX_PARAM]


def flatten_params(values: dict[str, Any]) -> dict[str, str]:
    """Nested dicts as dotted params: {"a": {"b": 1}} -> {"a.b": "1"}."""
    out: dict[str, str] = {}
    _flatten("", values, out)
    return out


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
