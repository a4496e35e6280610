"""Python client for rillet (and any TGI or OpenAI-compatible server).

Same surface as the ``text-generation`` client: ``generate``, ``generate_stream`` and the
same response types, plus ``chat`` on the OpenAI route; :class:`AsyncClient` is the twin.
It needs httpx and pydantic only: importing it never imports torch or the engine.
"""

from __future__ import annotations

from rillet.client.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientError,
    GenerationError,
    IncompleteGenerationError,
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnavailableError,
    UnknownError,
    ValidationError,
    parse_error,
)
from rillet.client.http import AsyncClient, Client
from rillet.client.types import (
    BestOfSequence,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ChatParameters,
    Details,
    FinishReason,
    GenerateParameters,
    PrefillToken,
    Response,
    StreamDetails,
    StreamResponse,
    Token,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "BestOfSequence",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "ChatMessage",
    "ChatParameters",
    "Client",
    "ClientError",
    "Details",
    "FinishReason",
    "GenerateParameters",
    "GenerationError",
    "IncompleteGenerationError",
    "InternalError",
    "MethodNotAllowedError",
    "NotFoundError",
    "OverloadedError",
    "PrefillToken",
    "ProtocolError",
    "Response",
    "StreamDetails",
    "StreamResponse",
    "Token",
    "UnavailableError",
    "UnknownError",
    "Usage",
    "ValidationError",
    "parse_error",
]
