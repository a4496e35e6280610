"""``rillet bench --response-format``: the same prompts, each answer held to a grammar.

Constrained and unconstrained runs differ only in the ``response_format`` field, so their
tokens/s compare the cost of constrained decoding (the mask per token, the matcher's
advance) and nothing else, provided both write the same number of tokens. The built-in
schema is why they do: a list of at least 64 people cannot end before ``--max-tokens``
(128 by default; one person is about 15 tokens), so every constrained request is cut at
the limit as the unconstrained ones are with ``ignore_eos``. ``ignore_eos`` itself is not
sent with a constraint: rillet refuses the pair (nothing may follow a grammar's end), and
the schema makes it moot. A schema of your own (``--schema FILE``) or ``json_object`` may
let answers end early: compare the runs' output tokens per request before their tok/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: At least 64 people of three fields each: longer than any usual ``--max-tokens``.
LONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "city": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer"},
                },
                "required": ["name", "city", "age"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
KINDS = ("json_object", "json_schema")


def response_format(kind: str, schema_file: Path | None = None) -> dict[str, Any]:
    """OpenAI's ``response_format`` for ``kind``; ValueError names a bad option."""
    if kind not in KINDS:
        raise ValueError(f"--response-format takes {' or '.join(KINDS)}, not {kind!r}")
    if kind == "json_object":
        if schema_file is not None:
            raise ValueError("--schema goes with --response-format json_schema")
        return {"type": "json_object"}
    schema = LONG_SCHEMA
    if schema_file is not None:
        try:
            schema = json.loads(schema_file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--schema {schema_file}: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"--schema {schema_file} must hold a JSON object")
    name = "bench" if schema_file is None else schema_file.stem
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
