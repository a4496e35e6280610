"""JSON Schema keywords xgrammar would not enforce are refused; the list is checked
against the installed library (each refused keyword really is ignored by it)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from rillet.constraint import Constraint
from rillet.engine.grammar import check_constraint
from rillet.engine.schema_support import check_schema_support
from rillet.errors import ValidationError

#: (base schema, keyword(s) added, a value the keyword forbids and the base allows)
IGNORED: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"type": "integer"}, {"not": {"const": 1}}, "1"),
    ({"type": "integer"}, {"if": {"minimum": 0}, "then": {"maximum": 3}}, "5"),
    ({"type": "array", "items": {"type": "integer"}}, {"uniqueItems": True}, "[1, 1]"),
    (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        {"dependentRequired": {"a": ["b"]}},
        '{"a": 1}',
    ),
    ({"type": "string"}, {"format": "ipv4-ish"}, '"x"'),
    ({"type": "number"}, {"multipleOf": 0.5}, "0.3"),
    ({}, {"allOf": [{"type": "integer"}, {"minimum": 3}]}, "1"),
]


def _accepts(schema: dict[str, Any], text: str) -> bool:
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    return bool(_is_grammar_accept_string(grammar, text))


@pytest.mark.parametrize(("base", "keyword", "breaking"), IGNORED)
def test_each_refused_keyword_is_one_the_library_ignores(
    base: dict[str, Any], keyword: dict[str, Any], breaking: str
) -> None:
    assert _accepts(base, breaking)
    assert _accepts({**base, **keyword}, breaking)  # still accepted: the keyword did nothing
    with pytest.raises(ValidationError, match="unsupported JSON Schema keyword"):
        check_schema_support({**base, **keyword})


def test_nested_keywords_are_found_and_named_by_path() -> None:
    schema = {
        "type": "object",
        "properties": {"not": {"type": "array", "items": {"uniqueItems": True}}},
    }
    with pytest.raises(ValidationError, match=r"`uniqueItems` at #/properties/not/items"):
        check_schema_support(schema)


def test_what_the_library_enforces_passes() -> None:
    check_schema_support(
        {
            "type": "object",
            "properties": {
                "when": {"type": "string", "format": "date-time", "description": "not"},
                "n": {"type": "integer", "multipleOf": 3},
                "x": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]},
            },
            "$defs": {"A": {"type": "string", "pattern": "^a+$"}},
        }
    )


def test_check_constraint_refuses_them_in_schemas_and_structural_tags() -> None:
    with pytest.raises(ValidationError, match="uniqueItems"):
        check_constraint(Constraint.json_schema({"type": "array", "uniqueItems": True}))
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<a>",
            "content": {"type": "json_schema", "json_schema": {"not": {}}},
            "end": "</a>",
        },
    }
    with pytest.raises(ValidationError, match="`not`"):
        check_constraint(Constraint.structural_tag(tag))
    tag["format"]["content"]["json_schema"] = {"type": "integer"}  # type: ignore[index]
    check_constraint(Constraint.structural_tag(tag))
