"""The client's sans-IO core: requests are built and answers read here, once.

:class:`~rillet.client.Client` and :class:`~rillet.client.AsyncClient` are thin shells that
move bytes with httpx; everything with an opinion (URLs, bodies, error mapping, SSE, ``[DONE]``,
in-band errors, retry delays) lives in this module, so sync and async cannot drift apart.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx
import pydantic

from rillet import __version__
from rillet.client.errors import (
    APIConnectionError,
    APITimeoutError,
    ClientError,
    IncompleteGenerationError,
    OverloadedError,
    ProtocolError,
    parse_error,
)
from rillet.client.sse import SSEDecoder
from rillet.client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChatParameters,
    GenerateParameters,
    Response,
    StreamResponse,
)

T = TypeVar("T")

#: Seconds to wait for connect, for each read (so: between two stream chunks) and each write.
DEFAULT_TIMEOUT = 60.0
#: The longest ``retry-after`` we honour; a bigger hint is clamped rather than obeyed blindly.
MAX_RETRY_AFTER = 60.0

Messages = Sequence[ChatMessage | Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API call, described without doing any I/O.

    ``parse`` turns one decoded JSON document (the body, or one stream event) into ``T``.
    ``is_last`` tells whether a parsed stream item is the stream's final answer.
    """

    path: str
    body: dict[str, Any]
    parse: Callable[[Any], T]
    is_last: Callable[[T], bool] = lambda _: False


def generate_call(prompt: str, parameters: GenerateParameters) -> Call[Response]:
    """``POST /generate``."""
    return Call("/generate", _generate_body(prompt, parameters), Response.model_validate)


def generate_stream_call(prompt: str, parameters: GenerateParameters) -> Call[StreamResponse]:
    """``POST /generate_stream``: TGI events, no ``[DONE]``; the last one has ``generated_text``."""
    return Call(
        "/generate_stream",
        _generate_body(prompt, parameters),
        StreamResponse.model_validate,
        is_last=lambda item: item.generated_text is not None,
    )


def chat_call(messages: Messages, parameters: ChatParameters) -> Call[ChatCompletion]:
    """``POST /v1/chat/completions`` without streaming."""
    body = _chat_body(messages, parameters, stream=False)
    return Call("/v1/chat/completions", body, ChatCompletion.model_validate)


def chat_stream_call(messages: Messages, parameters: ChatParameters) -> Call[ChatCompletionChunk]:
    """``POST /v1/chat/completions`` with ``stream: true``; the stream ends with ``[DONE]``."""
    body = _chat_body(messages, parameters, stream=True)
    return Call("/v1/chat/completions", body, ChatCompletionChunk.model_validate)


def _generate_body(prompt: str, parameters: GenerateParameters) -> dict[str, Any]:
    wire: dict[str, Any] = dict(parameters)
    if "stop_sequences" in wire:
        wire["stop"] = wire.pop("stop_sequences")
    # As the text-generation client does: details are cheap, and Response.details is the
    # documented way to read finish_reason and tokens.
    wire.setdefault("details", True)
    # Always send "parameters", even empty: TGI samples when it is absent altogether.
    return {"inputs": prompt, "parameters": wire}


def _chat_body(messages: Messages, parameters: ChatParameters, *, stream: bool) -> dict[str, Any]:
    wire: dict[str, Any] = dict(parameters)
    extra = wire.pop("extra_body", None) or {}
    body = {
        "messages": [
            m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m)
            for m in messages
        ],
        **wire,
        "stream": stream,
    }
    body.update(extra)
    return body


def request_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """Headers sent with every request."""
    result = {"user-agent": f"rillet-client/{__version__}", "accept": "application/json"}
    if api_key is not None:
        result["authorization"] = f"Bearer {api_key}"
    result.update(headers or {})
    return result


def read_response(call: Call[T], status: int, headers: Mapping[str, str], content: bytes) -> T:
    """The result of a non-streamed call, or the typed exception for an error answer."""
    if status >= 300:
        raise error_from_http(status, headers, content)
    return _validate(call, _loads(content))


def error_from_http(status: int, headers: Mapping[str, str], content: bytes) -> ClientError:
    """The typed exception for an HTTP error response (body read in full)."""
    try:
        payload: Any = json.loads(content)
    except ValueError:
        payload = content.decode("utf-8", errors="replace")
    return parse_error(status, payload, retry_after=parse_retry_after(headers.get("retry-after")))


def is_event_stream(status: int, headers: Mapping[str, str]) -> bool:
    """Whether a streamed call's response is an event stream (else: read it as an error)."""
    content_type = headers.get("content-type", "")
    return status < 300 and content_type.split(";")[0].strip() == "text/event-stream"


def error_from_non_stream(status: int, headers: Mapping[str, str], content: bytes) -> ClientError:
    """The exception for a streamed call answered by something other than an event stream."""
    if status >= 300:
        return error_from_http(status, headers, content)
    kind = headers.get("content-type", "no content-type")
    return ProtocolError(f"expected text/event-stream, got {kind}", status_code=status)


#: Sent on streamed calls when the client may resume: rillet then numbers the events and
#: names the stream (other servers ignore it).
RESUMABLE_HEADERS = {"x-rillet-resumable": "1"}
STREAM_ID_HEADER = "x-rillet-stream-id"


@dataclass(frozen=True, slots=True)
class Resume:
    """The request that picks a dropped stream up: ``GET path`` with ``headers``."""

    path: str
    headers: dict[str, str]


class StreamReader(Generic[T]):
    """Turns the bytes of an event stream into items; raises in-band error events.

    Both routes' conventions are handled: ``data: [DONE]`` ends an OpenAI stream; a TGI
    stream ends after the event that ``call.is_last`` recognises. Either way, :meth:`end`
    raises if the body closed before the stream's end.

    A stream the server made resumable (it named it in ``x-rillet-stream-id``) survives
    its connection: after a drop, :meth:`resume_after` says how to ask for the events after
    the last one read, and the new connection's bytes are fed here as the old one's were.
    """

    def __init__(self, call: Call[T]) -> None:
        self._call = call
        self._sse = SSEDecoder()
        self.started = False  # an item was handed out: retrying now would repeat tokens
        self.finished = False
        self.stream_id: str | None = None
        self.last_event_id = ""
        self._cut: IncompleteGenerationError | None = None
        self._resuming = False  # a resume was asked for and has not brought an event yet

    def connected(self, headers: Mapping[str, str]) -> None:
        """A connection's event stream starts: parse it afresh (a drop may have cut an
        event in half), and learn the stream's id if the server made it resumable."""
        self._sse = SSEDecoder()
        self.stream_id = headers.get(STREAM_ID_HEADER) or self.stream_id

    def feed(self, chunk: bytes) -> Iterator[T]:
        """Items completed by this chunk, lazily: an error event raises in its place."""
        for event in self._sse.feed(chunk):
            if self.finished:
                continue  # e.g. trailing bytes after [DONE]
            if event.id:
                self.last_event_id = event.id
            self._resuming = False
            if event.data == "[DONE]":
                self.finished = True
                continue
            payload = _loads(event.data)
            if isinstance(payload, dict) and payload.get("error") is not None:
                raise parse_error(None, payload)
            item = _validate(self._call, payload)
            self.finished = self._call.is_last(item)
            self.started = True
            yield item

    def end(self) -> None:
        """Call when the body is exhausted: a stream cut short is an error, not a success."""
        if not self.finished:
            self._cut = IncompleteGenerationError("the stream ended before its final event")
            raise self._cut

    def resume_after(self, error: ClientError) -> Resume | None:
        """How to pick the stream up after ``error``, or None to raise it: only a dropped
        connection (a transport error, or a body cut short) of a resumable stream, and
        once per drop (a resume that brings no event before dropping is the last)."""
        dropped = isinstance(error, APIConnectionError) or error is self._cut
        if not dropped or self.stream_id is None or self.finished or self._resuming:
            return None
        self._resuming = True
        headers = {"last-event-id": self.last_event_id} if self.last_event_id else {}
        return Resume(f"/streams/{self.stream_id}", headers)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry: only :class:`OverloadedError` (nothing was generated), never others."""

    max_retries: int = 0
    initial_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, error: ClientError) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or ``None`` to give up."""
        if attempt >= self.max_retries or not isinstance(error, OverloadedError):
            return None
        if error.retry_after is not None:
            return min(error.retry_after, MAX_RETRY_AFTER)
        backoff = min(self.initial_delay * 2**attempt, self.max_delay)
        # Up to 25% jitter, so clients refused together do not all come back together.
        return backoff * (1 - 0.25 * random.random())


def parse_retry_after(value: str | None) -> float | None:
    """``retry-after`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; be lenient about a missing zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@contextmanager
def transport_errors() -> Iterator[None]:
    """Re-raise httpx's transport errors as the client's own, keeping the cause."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"timed out: {exc}") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"connection failed: {exc!r}") from exc


def _loads(content: bytes | str) -> Any:
    try:
        return json.loads(content)
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON from server: {content[:200]!r}") from exc


def _validate(call: Call[T], payload: Any) -> T:
    try:
        return call.parse(payload)
    except pydantic.ValidationError as exc:
        raise ProtocolError(f"unexpected answer from {call.path}: {exc}", body=payload) from exc
