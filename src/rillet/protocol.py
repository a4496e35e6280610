"""Messages between the layers, named by hop.

    front door --EngineRequest--> AsyncEngine --(ids)--> EngineCore
    EngineCore --TokenDelta--> AsyncEngine (detokenize, stop strings) --RequestOutput--> front door

The core deals in token ids only; text appears first in :class:`RequestOutput`.
All messages are deltas: each carries only what is new since the previous one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rillet.sampling import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a request stopped. Values are TGI's wire strings; OpenAI maps them to stop/length."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"

    def to_openai(self) -> str:
        return "length" if self is FinishReason.LENGTH else "stop"


@dataclass(slots=True)
class EngineRequest:
    """A validated, tokenized request, ready for the engine.

    Built by the server's generation service after it has checked the client's request
    (so a door refuses bad input before it sends a single byte of response), or by
    ``engine.inputs.build_request`` for the engine's Python callers.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(slots=True)
class TokenDelta:
    """What one engine step produced for one request (ids only).

    ``logprobs[i]`` / ``top_logprobs[i]`` belong to ``new_token_ids[i]`` when the request
    asked for them. ``prompt_logprobs`` arrives once, with the first delta, when asked:
    one entry per prompt token, ``None`` for the first.
    """

    request_id: str
    new_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    prompt_logprobs: list[float | None] | None = None
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    #: The core's step counter for the step that made this delta (0: not from a core).
    step: int = 0
    #: time.monotonic() when the core sampled the request's first token: set on the delta
    #: that carries it, so the server can split time to first token into queue and prefill.
    first_token_time: float | None = None


@dataclass(slots=True)
class GeneratedToken:
    """One sampled token as a front door shows it.

    ``text`` is this token's share of the detokenized output: ``""`` while a multi-byte
    character is incomplete (its bytes come with a later token), never U+FFFD.
    """

    id: int
    text: str
    logprob: float | None
    special: bool
    top: list[GeneratedTopToken] = field(default_factory=list)


@dataclass(slots=True)
class GeneratedTopToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(slots=True)
class PromptToken:
    id: int
    text: str
    logprob: float | None


@dataclass(slots=True)
class RequestOutput:
    """A delta for one request, as the front doors consume it.

    ``tokens`` has one entry per newly sampled token (TGI streams one event each).
    ``text`` is the new visible text under the request's stop-string mode: text that could
    still turn into a stop string is held back until it cannot, and with
    ``include_stop_str_in_output=False`` the stop string itself never appears.
    When a slow consumer lets several deltas pile up they are merged with :meth:`merge`.
    """

    request_id: str
    tokens: list[GeneratedToken]
    text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_tokens: list[PromptToken] | None = None
    stop_sequence: str | None = None
    #: time.monotonic() when the engine first scheduled the request (its queue time ends)
    first_scheduled_time: float | None = None
    #: Why it finished, beyond ``finish_reason``: ``"timeout"`` when the request's own
    #: timeout ended it (``finish_reason`` is then ``length``). Doors show it as
    #: ``rillet_finish_detail``.
    finish_detail: str | None = None
    #: The engine step that made this delta (a merged output: the latest one's).
    step: int = 0
    #: time.monotonic() when the engine sampled the first token (its prefill ends).
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: RequestOutput) -> None:
        """Append a later delta of the same request to this one, in place."""
        self.tokens.extend(later.tokens)
        self.text += later.text
        self.finish_reason = later.finish_reason
        self.finish_detail = later.finish_detail
        self.num_generated_tokens = later.num_generated_tokens
        self.num_cached_tokens = later.num_cached_tokens
        if later.prompt_tokens is not None:
            self.prompt_tokens = later.prompt_tokens
        if later.stop_sequence is not None:
            self.stop_sequence = later.stop_sequence
        if self.first_scheduled_time is None:
            self.first_scheduled_time = later.first_scheduled_time
        if self.first_token_time is None:
            self.first_token_time = later.first_token_time
        self.step = max(self.step, later.step)
