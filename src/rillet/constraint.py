"""What a request's output must match: a door-neutral, picklable constraint spec.

Every door maps its own wire field (OpenAI ``response_format``, vLLM ``structured_outputs``,
TGI ``parameters.grammar``) onto one :class:`Constraint` in
:attr:`rillet.sampling.SamplingParams.constraint`. The spec is plain text, so it crosses
to an engine process unchanged and is its own cache key: the engine compiles each distinct
constraint once (``rillet.engine.grammar``). Nothing here imports a grammar library.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rillet.errors import ValidationError


class ConstraintKind(enum.StrEnum):
    """The languages a constraint can be written in."""

    JSON_SCHEMA = "json_schema"
    #: Any JSON object (OpenAI's ``json_object``); ``value`` is empty.
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    #: A context-free grammar in EBNF (GBNF-style, as vLLM's ``grammar`` takes it).
    GRAMMAR = "grammar"
    #: Exactly one of a list of strings; ``value`` is the list as JSON text.
    CHOICE = "choice"
    #: xgrammar's structural tag (JSON text): literal text and JSON-schema values in a
    #: sequence, e.g. a model's tool-call format around each tool's arguments.
    STRUCTURAL_TAG = "structural_tag"


@dataclass(frozen=True, slots=True)
class Constraint:
    """One constraint: a kind and its source text. Build with the class methods.

    Frozen and hashable: two requests with the same schema text share one compiled grammar.
    A schema's property order is kept (it is the order the model must write them in).
    """

    kind: ConstraintKind
    value: str = ""

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """A JSON Schema, given as an object or as JSON text. Raises ValidationError."""
        return cls(ConstraintKind.JSON_SCHEMA, _compact_object(schema, "JSON schema"))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls(ConstraintKind.JSON_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise ValidationError("a regex constraint must be a non-empty string")
        return cls(ConstraintKind.REGEX, pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> Constraint:
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise ValidationError("a grammar constraint must be a non-empty string")
        return cls(ConstraintKind.GRAMMAR, ebnf)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        if (
            isinstance(options, str)
            or not options
            or not all(isinstance(o, str) and o for o in options)
        ):
            raise ValidationError("a choice constraint must be a list of non-empty strings")
        return cls(ConstraintKind.CHOICE, json.dumps(list(options)))

    @classmethod
    def structural_tag(cls, tag: Mapping[str, Any] | str) -> Constraint:
        """A structural tag, ``{"type": "structural_tag", "format": {...}}``, as an object
        or as JSON text (vLLM's ``structured_outputs.structural_tag``). Raises
        ValidationError."""
        return cls(ConstraintKind.STRUCTURAL_TAG, _compact_object(tag, "structural tag"))

    @property
    def size(self) -> int:
        """The source's length in characters: what a server's size limit bounds."""
        return len(self.value)

    def describe(self) -> str:
        """A short label for logs and errors (never the whole source)."""
        return f"{self.kind.value} ({self.size} characters)"


def _compact_object(value: Mapping[str, Any] | str, what: str) -> str:
    """``value`` (an object, or JSON text of one) as compact JSON; ValidationError else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(f"the {what} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValidationError(f"a {what} must be a JSON object")
    return json.dumps(value, separators=(",", ":"))
