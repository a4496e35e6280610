"""The JSON Schema keywords the grammar library would accept and then not enforce.

xgrammar (0.2.x) compiles a schema that uses ``not``, ``if``/``then``, ``uniqueItems`` or
an unknown ``format`` without a word, and then generates output that breaks them. A client
that sent such a schema believes its output is checked when it is not, so these are
refused up front instead (a 4xx naming the keyword and where it is). The list was found by
compiling each keyword and feeding the grammar a value that breaks it
(``tests/engine/test_schema_support.py`` keeps it honest against the installed library).

Annotations that constrain nothing (``title``, ``description``, ``examples``, ``default``,
``$comment``, ``deprecated``, ``readOnly``...) are fine, as are the keywords xgrammar
enforces or rejects with its own error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from rillet.errors import ValidationError

#: Keywords whose constraint xgrammar drops silently.
IGNORED_KEYWORDS = {
    "not": "negation",
    "if": "conditionals",
    "then": "conditionals",
    "else": "conditionals",
    "dependentRequired": "dependencies between properties",
    "dependencies": "dependencies between properties",
    "dependentSchemas": "dependencies between properties",
    "uniqueItems": "unique array items",
    "minContains": "counts of `contains`",
    "maxContains": "counts of `contains`",
    "$dynamicRef": "dynamic references",
    "contentEncoding": "content encodings",
    "contentMediaType": "content media types",
    "contentSchema": "content schemas",
}
#: The ``format`` values xgrammar turns into a pattern; any other would be ignored.
ENFORCED_FORMATS = frozenset(
    {
        "date-time",
        "date",
        "time",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "uri-template",
        "uuid",
        "json-pointer",
        "relative-json-pointer",
    }
)
#: Keywords holding one subschema, and those holding a list or a map of them.
_ONE = ("items", "additionalProperties", "propertyNames", "contains", "unevaluatedProperties",
        "unevaluatedItems", "additionalItems")  # fmt: skip
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


def check_schema_support(schema: Any) -> None:
    """Raise ValidationError naming the first keyword of ``schema`` that would be ignored."""
    for path, node in _subschemas(schema, "#"):
        for keyword, what in IGNORED_KEYWORDS.items():
            if keyword in node:
                _refuse(path, keyword, f"{what} are not enforced by this server's grammar engine")
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in ENFORCED_FORMATS:
            _refuse(
                path,
                "format",
                f"format {fmt!r} is not enforced; supported formats: "
                + ", ".join(sorted(ENFORCED_FORMATS)),
            )
        all_of = node.get("allOf")
        if isinstance(all_of, list) and len(all_of) > 1:
            _refuse(path, "allOf", "an allOf of several schemas is not enforced; merge them")
        if "multipleOf" in node and not _only_integer(node):
            _refuse(path, "multipleOf", "multipleOf is enforced on integers only")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            _refuse(path, "$ref", "only local references (#/...) are resolved")


def _refuse(path: str, keyword: str, why: str) -> None:
    raise ValidationError(f"unsupported JSON Schema keyword `{keyword}` at {path}: {why}")


def _only_integer(node: Mapping[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "integer" or (isinstance(kind, list) and set(kind) <= {"integer", "null"})


def _subschemas(schema: Any, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema object in ``schema`` (itself included), with a JSON-pointer-ish path.
    Only schema positions are visited: a property *named* ``not`` is no keyword."""
    if not isinstance(schema, Mapping):
        return
    yield path, schema
    for key in _ONE:
        yield from _subschemas(schema.get(key), f"{path}/{key}")
    for key in _LIST:
        items = schema.get(key)
        if isinstance(items, list):
            for i, item in enumerate(items):
                yield from _subschemas(item, f"{path}/{key}/{i}")
    for key in _MAP:
        entries = schema.get(key)
        if isinstance(entries, Mapping):
            for name, item in entries.items():
                yield from _subschemas(item, f"{path}/{key}/{name}")
