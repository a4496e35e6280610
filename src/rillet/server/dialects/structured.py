"""OpenAI's ``response_format`` and vLLM's ``structured_outputs`` as a
:class:`~rillet.constraint.Constraint` (no transport).

``{"type": "text"}`` (or none) leaves the output free; ``{"type": "json_object"}`` asks for
any JSON object; ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
for one that matches ``schema`` (without a schema, any object). The engine enforces it
while generating, whatever ``strict`` says, as vLLM does: a constraint that is only
sometimes kept is not one a client can parse on.

vLLM's ``structured_outputs`` is exactly one of ``{"json": schema}``, ``{"regex": ...}``,
``{"choice": [...]}``, ``{"grammar": EBNF}``, ``{"json_object": true}`` or
``{"structural_tag": ...}``; its older top-level ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` say the same. :func:`body_constraint` reads all of
them, for every door whose body carries OpenAI's field names (OpenAI, ``/ws``, KServe),
and refuses a body that asks for two constraints at once. Options that shape the grammar
(``disable_any_whitespace``, ``whitespace_pattern``...) are accepted and not applied:
rillet's JSON is always on one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rillet.constraint import Constraint
from rillet.errors import ValidationError
from rillet.server.dialects.fields import json_loads

#: vLLM's constraint keys, each with the old top-level field that meant the same.
_STRUCTURED_KEYS = {
    "json": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
_OTHER_KEYS = ("json_object", "structural_tag")


def body_constraint(body: Mapping[str, Any]) -> Constraint | None:
    """The one constraint a body's ``response_format``, ``structured_outputs`` and
    ``guided_*`` fields ask for (a field given as a JSON string is read as JSON); None
    if none does. Raises ValidationError (400/422) for a malformed one or for two."""
    found: list[tuple[str, Constraint]] = []
    response_format = _object(body.get("response_format"), "response_format")
    constraint = response_format_constraint(response_format)
    if constraint is not None:
        found.append(("response_format", constraint))
    structured = _object(body.get("structured_outputs"), "structured_outputs")
    if structured is not None:
        constraint = structured_outputs_constraint(structured)
        if constraint is not None:
            found.append(("structured_outputs", constraint))
    for key, old in _STRUCTURED_KEYS.items():
        value = body.get(old)
        if value is not None:
            found.append((old, _structured(key, value, old)))
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise ValidationError(f"only one output constraint per request: {names} were given")
    return found[0][1] if found else None


def structured_outputs_constraint(spec: Mapping[str, Any]) -> Constraint | None:
    """vLLM's ``structured_outputs`` object: exactly one constraint key."""
    given = [k for k in (*_STRUCTURED_KEYS, *_OTHER_KEYS) if spec.get(k) not in (None, False)]
    if len(given) > 1:
        raise ValidationError(
            f"`structured_outputs` takes exactly one of json, regex, choice, grammar, "
            f"json_object, structural_tag. Given: {', '.join(given)}"
        )
    if not given:
        return None
    key = given[0]
    return _structured(key, spec[key], f"structured_outputs.{key}")


def _structured(key: str, value: Any, where: str) -> Constraint:
    try:
        if key == "json":
            return Constraint.json_schema(value)
        if key == "regex":
            return Constraint.regex(value)
        if key == "choice":
            if isinstance(value, str):
                value = json_loads(value)
            if not isinstance(value, list):
                raise ValidationError("a choice constraint must be a list of non-empty strings")
            return Constraint.choice(value)
        if key == "grammar":
            return Constraint.grammar(value)
        if key == "json_object":
            return Constraint.json_object()
        return Constraint.structural_tag(value)
    except ValidationError as exc:
        raise ValidationError(f"`{where}`: {exc.message}") from None
    except ValueError as exc:
        raise ValidationError(f"`{where}` is not valid JSON: {exc}") from None


def _object(value: Any, where: str) -> Mapping[str, Any] | None:
    """An object field, which a door whose values are strings (KServe parameters) may
    send as JSON text."""
    if isinstance(value, str):
        try:
            value = json_loads(value)
        except ValueError as exc:
            raise ValidationError(f"`{where}` is not valid JSON: {exc}") from None
    if value is not None and not isinstance(value, Mapping):
        raise ValidationError(f"`{where}` must be an object")
    return value


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
