"""Prompt -> EngineRequest, and what the engine itself needs of every request.

A server's client is checked by the generation service (``rillet.server.service``), in the
client's words and against the configured limits; what is here serves the engine's Python
callers (``LLM``, ``AsyncEngine.make_request``, benchmarks) and the core's own guard, in
neutral words. The checks a client's request and a Python caller's share are single
functions: ``SamplingParams.validate`` and :func:`check_token_ids`.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rillet.errors import ValidationError
from rillet.protocol import EngineRequest
from rillet.sampling import SamplingParams

if TYPE_CHECKING:
    from rillet.tokenizer import Tokenizer

_counter = itertools.count()


def new_request_id() -> str:
    return f"{uuid.uuid4().hex[:16]}-{next(_counter)}"


def new_request(
    prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
) -> EngineRequest:
    """An engine request for a prompt that has been checked already (nothing checked here)."""
    return EngineRequest(request_id or new_request_id(), prompt_token_ids, params, time.monotonic())


def check_token_ids(ids: Sequence[object], vocab_size: int) -> None:
    """Every prompt token id is an int in the model's vocabulary (the embedding's rows)."""
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise ValidationError(f"prompt token ids must be integers in [0, {vocab_size})")


def check_prompt_length(num_prompt_tokens: int, max_model_len: int) -> None:
    """The engine's own bound: a prompt of at least one token that leaves room in the context
    for one more. Callers with stricter limits of their own (the server's) check those first."""
    if num_prompt_tokens == 0:
        raise ValidationError("prompt token ids must not be empty")
    if num_prompt_tokens >= max_model_len:
        raise ValidationError(
            f"prompt token ids must be fewer than max_model_len ({max_model_len}). "
            f"Given: {num_prompt_tokens}"
        )


def check_params(params: SamplingParams) -> None:
    """The sampling fields, and a constraint's grammar (a bad schema or regex is refused
    here, before the request exists, not as an error in its stream)."""
    params.validate()
    if params.constraint is not None:
        # Here, not at the top: the grammar module brings torch and xgrammar, and the
        # client and the CLI import the server's modules without either.
        from rillet.engine.grammar import check_constraint

        check_constraint(params.constraint)


def build_request(
    tokenizer: Tokenizer,
    vocab_size: int,
    max_model_len: int,
    prompt: str | Sequence[int],
    params: SamplingParams,
    request_id: str | None = None,
    add_special_tokens: bool = True,
) -> EngineRequest:
    """Tokenize and check for the engine; raises ValidationError (neutral words)."""
    check_params(params)
    if isinstance(prompt, str):
        # Before encoding: "" may still encode to a lone BOS.
        if not prompt:
            raise ValidationError("prompt must not be empty")
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    else:
        ids = list(prompt)
        check_token_ids(ids, vocab_size)
    check_prompt_length(len(ids), max_model_len)
    return new_request(ids, params, request_id)
