"""The plain-text dialect: ``POST /?prompt=...`` as the Ray Serve streaming tutorial sends it.

That client posts no body and reads the answer as ``text/plain``, one chunk per piece of
text. The prompt is used as is (no chat template), decoding is greedy, and
``max_new_tokens`` may be given as a query parameter too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.limits import FieldNames
from rillet.server.spec import GenerationSpec

DEFAULT_MAX_NEW_TOKENS = 128
PLAIN_FIELDS = FieldNames(prompt="prompt", max_new_tokens="max_new_tokens")


@dataclass
class PlainPlan:
    spec: GenerationSpec


def plan(prompt: str, query: Mapping[str, str]) -> PlainPlan:
    raw_limit = query.get("max_new_tokens", str(DEFAULT_MAX_NEW_TOKENS))
    if not raw_limit.isdigit():
        raise ValidationError("`max_new_tokens` must be a positive integer")
    params = SamplingParams(max_new_tokens=int(raw_limit), temperature=0.0)
    return PlainPlan(GenerationSpec(prompt, params, names=PLAIN_FIELDS))
