"""Deadlines and timing a request may ask for, and the queue's prediction that judges them.

A client says how long it will wait for its first token (``X-Rillet-Max-Queue-Ms`` on HTTP,
``max_queue_ms`` in a ``/ws`` frame or gRPC parameters; ``--max-queue-ms`` by default) and
how long the whole request may take (``X-Rillet-Timeout-Ms``, ``timeout_ms``;
``--request-timeout``). The service refuses at once a request the queue cannot serve in
time, predicting its time to first token from what the engine measures of itself
(``EngineStats``: prompt tokens still queued, the prefill rate, the step time), and ends an
admitted one that misses its first token's deadline; a request past its whole timeout ends
with what it has (``Generation.stream``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rillet.errors import ValidationError

#: The HTTP doors' request headers (the other doors take the field names).
MAX_QUEUE_HEADER = "x-rillet-max-queue-ms"
TIMEOUT_HEADER = "x-rillet-timeout-ms"
TIMING_HEADER = "x-rillet-timing"
#: A ``/ws`` frame's and a gRPC request's fields.
MAX_QUEUE_FIELD = "max_queue_ms"
TIMEOUT_FIELD = "timeout_ms"
TIMING_FIELD = "timing"
#: The finish detail of a request its timeout ended (``rillet_finish_detail`` on the wire).
TIMEOUT_DETAIL = "timeout"


@dataclass(frozen=True)
class RequestOptions:
    """What one request asked for besides generation: None leaves it to the server."""

    max_queue_ms: int | None = None
    timeout_ms: int | None = None
    timing: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RequestOptions:
        """From an HTTP request's headers (ValidationError naming a bad one)."""
        return cls(
            _milliseconds(headers.get(MAX_QUEUE_HEADER), "X-Rillet-Max-Queue-Ms"),
            _milliseconds(headers.get(TIMEOUT_HEADER), "X-Rillet-Timeout-Ms"),
            _flag(headers.get(TIMING_HEADER), "X-Rillet-Timing"),
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> RequestOptions:
        """From a ``/ws`` frame's or a gRPC request's parameters (numbers or strings)."""
        return cls(
            _milliseconds(fields.get(MAX_QUEUE_FIELD), MAX_QUEUE_FIELD),
            _milliseconds(fields.get(TIMEOUT_FIELD), TIMEOUT_FIELD),
            _flag(fields.get(TIMING_FIELD), TIMING_FIELD),
        )


def _milliseconds(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a number of milliseconds")
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and value.isdigit()) or len(value) > 12:
            raise ValidationError(f"`{name}` must be a number of milliseconds, got {value[:20]!r}")
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        raise ValidationError(f"`{name}` must be a positive number of milliseconds")
    return value


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).strip().lower() in ("1", "true"):
        return True
    if str(value).strip().lower() in ("0", "false", ""):
        return False
    raise ValidationError(f"`{name}` must be 1 or 0")


class QueueStats(Protocol):
    """What the prediction reads of ``engine.stats()``."""

    num_queued_prompt_tokens: int
    prefill_tokens_per_s: float
    step_time_s: float


def predict_first_token_s(stats: QueueStats, num_prompt_tokens: int) -> float | None:
    """Seconds until a request with ``num_prompt_tokens`` queued now has its first token:
    the prompts ahead of it and its own, at the measured prefill rate, and one step. None
    while the engine has not measured itself (no refusal on a guess)."""
    rate = stats.prefill_tokens_per_s
    if rate <= 0:
        return None
    backlog = stats.num_queued_prompt_tokens + num_prompt_tokens
    return backlog / rate + stats.step_time_s


def retry_after_s(predicted_s: float, budget_s: float) -> int:
    """Whole seconds until the queue has drained enough for ``predicted_s`` to fit
    ``budget_s`` at the rate it drains now (at least 1: ``retry-after`` is whole seconds)."""
    return max(1, math.ceil(predicted_s - budget_s))
