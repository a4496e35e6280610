"""Reading a whole SSE body that a test has as text."""

from __future__ import annotations

import json
from typing import Any


def data_events(text: str) -> list[Any]:
    """The JSON of each ``data: {...}`` event, in order (``[DONE]`` and comments left out)."""
    return [
        json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e.startswith("data: {")
    ]


def named_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each named SSE event (Anthropic's, Responses')."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out
