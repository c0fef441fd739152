"""Nested JSON payloads as flat field paths, for the events table and the chart.

``{"d": {"temp": 21.5, "tags": ["a"]}}`` becomes ``{"d.temp": 21.5, "d.tags.0": "a"}``. Only
numbers (not booleans) are charted; everything shows in the table. The walk is bounded
(:data:`MAX_FIELDS`, :data:`MAX_DEPTH`) so that a device cannot make a page heavy by sending a
deep or wide payload; what is cut is shown as ``…``. ``static/app.js`` flattens live events
the same way.
"""

from __future__ import annotations

from typing import Any, Final

MAX_FIELDS: Final = 64
MAX_DEPTH: Final = 8
MAX_TEXT: Final = 200  # characters of a non-JSON payload shown in a cell; the API has all of it
ELLIPSIS: Final = "…"


def flatten(payload: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(value: Any, path: str, depth: int) -> None:
        if len(out) >= MAX_FIELDS:
            out[ELLIPSIS] = ELLIPSIS
            return
        if isinstance(value, dict | list) and depth >= MAX_DEPTH:
            out[path or ELLIPSIS] = ELLIPSIS
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k), depth + 1)
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}.{i}" if path else str(i), depth + 1)
            return
        out[path or "value"] = value

    walk(payload, "", 0)
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def opaque_fields(fmt: str, value: str, encoding: str) -> dict[str, Any]:
    """A text or binary payload (format other than json) as one field named for its format.

    ``text`` payloads under the format's name, ``bin`` ones as ``"bin (base64)"``; cut at
    :data:`MAX_TEXT` characters. ``static/app.js`` does the same for live events.
    """
    label = fmt if encoding == "text" else f"{fmt} ({encoding})"
    return {label: value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + ELLIPSIS}
