"""What the server answers, as typed objects.

The TGI types keep the names and fields of the ``text-generation`` client's README, so code
written against that client reads the same here. The chat types follow OpenAI's
``/v1/chat/completions`` objects. Unknown fields are ignored (servers add fields over
time); missing required fields are a protocol error, raised by the caller.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    # "ignore" rather than "forbid": a newer server may add fields, and an old client must
    # keep working against it.
    model_config = ConfigDict(extra="ignore")


class FinishReason(StrEnum):
    """Why a generation stopped (TGI's wire strings)."""

    #: number of generated tokens == ``max_new_tokens``
    Length = "length"
    #: the model generated its end-of-sequence token
    EndOfSequenceToken = "eos_token"
    #: the model generated a text included in ``stop_sequences``
    StopSequence = "stop_sequence"


class PrefillToken(_Model):
    """A prompt token; ``logprob`` is ``None`` for the first one (nothing precedes it)."""

    id: int
    text: str
    logprob: float | None = None


class Token(_Model):
    """A generated token. ``special`` tokens (e.g. EOS) are usually skipped when joining."""

    id: int
    text: str
    logprob: float
    special: bool


class BestOfSequence(_Model):
    """One of the extra candidates of a ``best_of`` request."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = None


class Details(_Model):
    """Details of a non-streamed generation.

    ``prefill`` is filled only with ``decoder_input_details=True``; ``top_tokens`` only
    with ``top_n_tokens``; ``seed`` only when sampling.
    """

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class Response(_Model):
    """What ``generate`` returns. ``details`` is ``None`` only if asked with ``details=False``."""

    generated_text: str
    details: Details | None = None


class StreamDetails(_Model):
    """Details sent with the last event of a stream."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int | None = None


class StreamResponse(_Model):
    """One event of ``generate_stream``: one token.

    ``generated_text`` (the whole text) and ``details`` arrive only on the last event.
    """

    index: int | None = None
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class GenerateParameters(TypedDict, total=False):
    """Keyword parameters of ``generate`` / ``generate_stream``.

    Only the ones given are sent; the server applies its defaults and validates ranges
    (the client never second-guesses it). ``stop_sequences`` is sent as TGI's ``stop``.
    """

    best_of: int
    decoder_input_details: bool
    details: bool
    do_sample: bool
    frequency_penalty: float
    grammar: dict[str, Any]
    max_new_tokens: int
    repetition_penalty: float
    return_full_text: bool
    seed: int
    stop_sequences: list[str]
    temperature: float
    top_k: int
    top_n_tokens: int
    top_p: float
    truncate: int
    typical_p: float
    watermark: bool


# ---- OpenAI chat ------------------------------------------------------------------------


class ChatMessage(_Model):
    """One message of a conversation: ``{"role": "user", "content": "..."}``."""

    role: str
    content: str | None = None


class TopLogprob(_Model):
    token: str
    logprob: float


class TokenLogprob(_Model):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _ChatChoiceBase(_Model):
    index: int = 0
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatChoice(_ChatChoiceBase):
    message: ChatMessage


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_ChatChoiceBase):
    delta: ChatDelta


class _ChatReplyBase(_Model):
    id: str = ""
    created: int = 0
    model: str = ""
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatCompletion(_ChatReplyBase):
    """A whole chat reply (``chat(..., stream=False)``)."""

    object: str = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_ChatReplyBase):
    """One chunk of a streamed chat reply. The usage chunk has ``choices == []``."""

    object: str = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ChatParameters(TypedDict, total=False):
    """Keyword parameters of ``chat``, named as in OpenAI's API; only the given ones are sent.

    ``extra_body`` is merged into the request as is, for server extensions (``top_k``, ...).
    """

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: str | list[str]
    frequency_penalty: float
    presence_penalty: float
    logprobs: bool
    top_logprobs: int
    stream_options: dict[str, Any]
    extra_body: dict[str, Any]
