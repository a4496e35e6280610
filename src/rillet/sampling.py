"""Per-request sampling parameters, validated once at the edge.

Every front door (TGI, OpenAI, WebSocket, gRPC) maps its own wire fields onto one
:class:`SamplingParams`; the engine never sees wire formats. ``validate()`` raises
:class:`~rillet.errors.ValidationError` with a message fit for the client: never ``assert``.
The params are frozen: a layer that fills a field (the server's defaults, its token limits)
makes a new value with ``dataclasses.replace`` and hands that on, so nobody's copy changes
under them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rillet.constraint import Constraint
from rillet.errors import ValidationError

#: The most alternatives a request may ask for per token (TGI's ``--max-top-n-tokens`` is 5,
#: OpenAI's ``top_logprobs`` allows 20).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` means greedy. ``top_k <= 0``, ``top_p == 1``, ``typical_p == 1``
    and ``min_p == 0`` switch those filters off. ``max_new_tokens=None`` means "until the
    context is full". Stop strings are matched on the detokenized text at the edge;
    ``include_stop_str_in_output`` picks TGI's behaviour (True) or OpenAI's (False).
    ``constraint`` restricts every generated token to those its grammar allows next (the
    engine masks the rest; see ``rillet.engine.grammar``).
    ``num_speculative_tokens`` caps this request's draft tokens per step below the server's
    ``--num-speculative-tokens`` (None: the server's; 0: no speculation for this request).
    """

    max_new_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    skip_special_tokens: bool = True
    constraint: Constraint | None = None
    num_speculative_tokens: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingParams:
        """Check every field; return self so calls can chain. Raises ValidationError."""
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if self.min_tokens < 0:
            raise ValidationError("`min_tokens` must be non-negative")
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ValidationError("`min_tokens` must be <= `max_new_tokens`")
        _finite_in("temperature", self.temperature, 0.0, None)
        if not 0.0 < self.top_p <= 1.0 or math.isnan(self.top_p):
            raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
        if not 0.0 < self.typical_p <= 1.0 or math.isnan(self.typical_p):
            raise ValidationError("`typical_p` must be > 0.0 and <= 1.0")
        _finite_in("min_p", self.min_p, 0.0, 1.0)
        if self.top_k < 0:
            raise ValidationError("`top_k` must be non-negative (0 disables it)")
        if not self.repetition_penalty > 0.0 or not math.isfinite(self.repetition_penalty):
            raise ValidationError("`repetition_penalty` must be strictly positive")
        _finite_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _finite_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValidationError("`seed` must be an integer in [0, 2**64)")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValidationError(f"`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValidationError("`stop` sequences must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValidationError("`stop_token_ids` must be non-negative integers")
        if self.num_speculative_tokens is not None and not (
            isinstance(self.num_speculative_tokens, int) and self.num_speculative_tokens >= 0
        ):
            raise ValidationError("`num_speculative_tokens` must be a non-negative integer")
        if self.constraint is not None and self.ignore_eos:
            # A finished grammar allows only EOS: ignoring it would leave nothing to sample.
            raise ValidationError("`ignore_eos` cannot be combined with a grammar constraint")
        return self


def _finite_in(name: str, value: float, low: float | None, high: float | None) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"`{name}` must be a finite number")
    if low is not None and value < low:
        raise ValidationError(f"`{name}` must be >= {low}")
    if high is not None and value > high:
        raise ValidationError(f"`{name}` must be <= {high}")
