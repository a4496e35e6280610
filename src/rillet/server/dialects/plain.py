"""The plain-text dialect: ``POST /?prompt=...`` as the Ray Serve streaming tutorial sends it.

That client posts no body and reads the answer as ``text/plain``, one chunk per piece of
text. The prompt is the user's turn: it goes through the model's chat template when the
model has one (an instruct model given the tutorial's raw "Tell me a story about dogs."
answers EOS at once), unless ``raw=true`` asks for it as is. Decoding is greedy, and
``max_new_tokens`` may be given as a query parameter too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.limits import FieldNames
from rillet.server.spec import ChatPrompt, GenerationSpec

DEFAULT_MAX_NEW_TOKENS = 128
PLAIN_FIELDS = FieldNames(prompt="prompt", max_new_tokens="max_new_tokens")


@dataclass
class PlainPlan:
    spec: GenerationSpec


def plan(prompt: str, query: Mapping[str, str], *, has_chat_template: bool) -> PlainPlan:
    raw_limit = query.get("max_new_tokens", str(DEFAULT_MAX_NEW_TOKENS))
    if not raw_limit.isdigit():
        raise ValidationError("`max_new_tokens` must be a positive integer")
    raw = query.get("raw", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ValidationError("`raw` must be true or false")
    params = SamplingParams(max_new_tokens=int(raw_limit), temperature=0.0)
    if has_chat_template and raw in ("false", "0") and prompt:
        chat = ChatPrompt([{"role": "user", "content": prompt}])
        return PlainPlan(GenerationSpec(chat, params, names=PLAIN_FIELDS))
    return PlainPlan(GenerationSpec(prompt, params, names=PLAIN_FIELDS))
