"""Python client for rillet (and any TGI or OpenAI-compatible server).

Same surface as the ``text-generation`` client: ``generate``, ``generate_stream`` and the
same response types, plus ``chat`` on the OpenAI route; :class:`AsyncClient` is the twin.
It needs httpx and pydantic only: importing it never imports torch or the engine.
:class:`StreamingClient` / :class:`AsyncStreamingClient` (NuPIC's callback client, on
Triton's gRPC protocol) add grpcio and protobuf, imported when first used.
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
    "AsyncStreamingClient",
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
    "StreamingClient",
    "Token",
    "UnavailableError",
    "UnknownError",
    "Usage",
    "ValidationError",
    "parse_error",
]


def __getattr__(name: str) -> object:
    # The gRPC clients load grpcio on first use, so HTTP-only users never import it.
    if name in ("StreamingClient", "AsyncStreamingClient"):
        from rillet.client import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
