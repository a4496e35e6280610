"""Prompt -> validated EngineRequest: the one place input is checked before the engine."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence

from rillet.engine.grammar import check_constraint
from rillet.errors import ValidationError
from rillet.protocol import EngineRequest
from rillet.sampling import SamplingParams
from rillet.tokenizer import Tokenizer

_counter = itertools.count()


def new_request_id() -> str:
    return f"{uuid.uuid4().hex[:16]}-{next(_counter)}"


def build_request(
    tokenizer: Tokenizer,
    vocab_size: int,
    max_model_len: int,
    prompt: str | Sequence[int],
    params: SamplingParams,
    request_id: str | None = None,
    add_special_tokens: bool = True,
) -> EngineRequest:
    """Tokenize and validate; raises ValidationError with a message for the client."""
    params.validate()
    if params.constraint is not None:
        check_constraint(params.constraint)  # a bad schema or regex is a 422, not a stream error
    if isinstance(prompt, str):
        if not prompt:
            raise ValidationError("`inputs` cannot be empty")
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    else:
        ids = list(prompt)
        if any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in ids
        ):
            raise ValidationError(f"prompt token ids must be integers in [0, {vocab_size})")
    if not ids:
        raise ValidationError("`inputs` cannot be empty")
    if len(ids) >= max_model_len:
        raise ValidationError(
            f"`inputs` must have less than {max_model_len} tokens. Given: {len(ids)}"
        )
    return EngineRequest(request_id or new_request_id(), ids, params, time.monotonic())
