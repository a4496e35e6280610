"""Field types and value rules that several dialects share.

Bodies are lenient as real servers are: unknown keys are ignored (TGI has no
``deny_unknown_fields``; vLLM uses ``extra="allow"``), every optional field takes
``null``, and ``stop`` may be a string or a list.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from rillet.errors import ValidationError

#: vLLM clamps logprobs to this so ``-inf`` never reaches JSON.
MIN_LOGPROB = -9999.0

#: JSON nested deeper than this is refused before it is parsed. Python's json recurses once
#: per level, so about 1,000 levels (a 2 KB body) raise RecursionError. Our bodies need 5
#: (messages with content parts); tool schemas nest a few levels more.
MAX_JSON_DEPTH = 64

# A JSON string (skipped whole: brackets inside it do not count), a quote that opens a string
# never closed (the rest is that string), or one bracket. Possessive quantifiers and the stop
# at an unclosed string keep the scan linear, whatever the input.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|"|[\[\]{}]', re.DOTALL)


def json_loads(raw: str | bytes) -> Any:
    """``json.loads``, but JSON nested deeper than :data:`MAX_JSON_DEPTH` is a
    ValidationError instead of a RecursionError. Malformed JSON raises ValueError as
    ``json.loads`` does."""
    if not isinstance(raw, str | bytes):  # as json.loads: a TypeError
        raise TypeError(f"JSON must be str or bytes, not {type(raw).__name__}")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # only then can it be too deep
        depth = 0
        for match in _JSON_TOKENS.finditer(text):
            token = match.group()
            if token == '"':
                break  # an unclosed string: json.loads will refuse it
            depth += 1 if token in "[{" else -1 if token in "]}" else 0
            if depth > MAX_JSON_DEPTH:
                raise ValidationError(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(raw)


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SpeculativeCap(Lenient):
    """llama-server's per-request cap on draft tokens, ``"speculative.n_max"``: at most the
    server's ``--num-speculative-tokens`` a step for this request, 0 for none
    (``SamplingParams.num_speculative_tokens``).

    Declared here once for the bodies that take it: OpenAI chat and completions (where
    llama-server reads it) and what reads OpenAI's sampling fields (``/ws``'s ``generate``
    frames, KServe's ``sampling_parameters``), and Responses (llama-server turns a Responses
    body into a chat body with every other field kept, so the cap travels with it). Not on
    the doors whose peers have no such field: TGI (no per-request speculation), Anthropic
    (llama-server's Messages route copies only the fields it knows), and the plain-text and
    tutorial WebSocket doors, which take no sampling options at all.
    """

    speculative_n_max: int | None = Field(default=None, alias="speculative.n_max", ge=0)


Stop = str | list[str] | None


def stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def clean_logprob(value: float | None) -> float | None:
    """A JSON-safe logprob: NaN -> null (TGI's first prefill token), -inf -> -9999."""
    if value is None or math.isnan(value):
        return None
    return max(float(value), MIN_LOGPROB)


def first_problem(exc: pydantic.ValidationError, where_default: str) -> str:
    """``"<field path>: <message>"`` of a body's first problem, for a ValidationError."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or where_default
    return f"{where}: {first['msg']}"
