"""OpenAI's ``response_format`` as a :class:`~rillet.constraint.Constraint` (no transport).

``{"type": "text"}`` (or none) leaves the output free; ``{"type": "json_object"}`` asks for
any JSON object; ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
for one that matches ``schema`` (without a schema, any object). The engine enforces it
while generating, whatever ``strict`` says, as vLLM does: a constraint that is only
sometimes kept is not one a client can parse on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rillet.constraint import Constraint
from rillet.errors import ValidationError


def response_format_constraint(response_format: Mapping[str, Any] | None) -> Constraint | None:
    """The constraint ``response_format`` asks for; None for free text. Raises
    ValidationError (400) for a malformed or unsupported one."""
    if response_format is None:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValidationError(
                '`response_format.json_schema` must be an object: {"name", "schema", "strict"}'
            )
        schema = spec.get("schema")
        return Constraint.json_object() if schema is None else Constraint.json_schema(schema)
    raise ValidationError(
        f"`response_format.type` must be text, json_object or json_schema. Given: {kind!r}"
    )
