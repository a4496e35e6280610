"""Anthropic's Messages out: stream events, the whole message and errors (no transport).

The stream, in the order Anthropic's SDK insists on (``MessageStream`` raises unless
``message_start`` comes first; blocks are appended, so they go in index order):
``message_start`` (usage with the prompt's tokens and 0 output tokens, as vLLM), then the
text block (``content_block_start``, ``text_delta`` per output, ``content_block_stop``),
opened with the first text, so an empty answer has no block, as its whole message has no
content; then ``message_delta`` (``stop_reason``, ``stop_sequence``, the *cumulative*
``usage.output_tokens``, which the SDK takes as the total), then ``message_stop``. The
transport names each event (``event:`` lines) and sends ``ping`` as the keep-alive.

``stop_reason``: ``end_turn`` (end of sequence, or a stop token), ``max_tokens`` (the cap, or
the request's timeout: then ``rillet_finish_detail: "timeout"`` as on the other doors),
``stop_sequence`` with the client's sequence that matched.
"""

from __future__ import annotations

from typing import Any

from rillet.errors import RilletError
from rillet.protocol import FinishReason, RequestOutput

#: rillet's error_type -> Anthropic's ``error.type`` (docs.claude.com/en/api/errors).
_TYPES = {
    "validation": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error",
    "overloaded": "overloaded_error",
}


def status(exc: RilletError) -> int:
    """The HTTP status Anthropic's clients expect for ``exc``.

    Bad input is 400 (413 and 431 keep theirs). Overload stays **429**, with the type
    ``overloaded_error``: Anthropic answers its own overload with 529, and the SDK retries
    429 and 529 alike (honouring ``retry-after``), so nothing is lost for its clients, while
    429 keeps rillet's one backpressure rule ("refused at once with 429 overloaded") for
    every door, and for the proxies, load balancers and Ray Serve in front of it, which know
    429 as "back off" but would count a 5xx as the server failing. The type says what it is
    (the server is busy, not the key rate-limited); the SDK raises ``RateLimitError``.
    A generation failure (TGI's 424) has no Anthropic code: it is a 500 ``api_error``.
    """
    if exc.http_status == 422:
        return 400
    if exc.http_status == 424:
        return 500
    return exc.http_status


def error_type(exc: RilletError) -> str:
    if exc.http_status == 413:
        return "request_too_large"
    return _TYPES.get(exc.error_type, "api_error")


def error_body(exc: RilletError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``: a response body or the data of
    an in-stream ``error`` event."""
    return {"type": "error", "error": {"type": error_type(exc), "message": exc.message}}


def stop_reason(out: RequestOutput) -> str:
    if out.finish_reason is FinishReason.LENGTH:
        return "max_tokens"
    if out.finish_reason is FinishReason.STOP_SEQUENCE and out.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


class AnthropicRenderer:
    """One request's events and message; it keeps what the events need across outputs."""

    def __init__(self, model_name: str, request_id: str, num_prompt_tokens: int) -> None:
        self.id = f"msg_{request_id}"
        self.model_name = model_name
        self.num_prompt_tokens = num_prompt_tokens
        self._block_open = False

    def message(self, content: list[dict[str, Any]], last: RequestOutput | None) -> dict[str, Any]:
        """The message object: empty and unfinished for ``message_start``, whole at the end."""
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model_name,
            "content": content,
            "stop_reason": None if last is None else stop_reason(last),
            "stop_sequence": None if last is None else _matched(last),
            "usage": self.usage(last),
        }
        if last is not None and last.finish_detail is not None:
            message["rillet_finish_detail"] = last.finish_detail
        return message

    def usage(self, last: RequestOutput | None) -> dict[str, int]:
        prompt = self.num_prompt_tokens if last is None else last.num_prompt_tokens
        return {
            "input_tokens": prompt or self.num_prompt_tokens,
            "output_tokens": 0 if last is None else last.num_generated_tokens,
        }

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        return [("message_start", {"type": "message_start", "message": self.message([], None)})]

    def events(self, out: RequestOutput) -> list[tuple[str, dict[str, Any]]]:
        """The named events for one engine output; the last output closes the message."""
        events = []
        if out.text:
            if not self._block_open:
                self._block_open = True
                block = {"type": "text", "text": ""}
                start = {"type": "content_block_start", "index": 0, "content_block": block}
                events.append(("content_block_start", start))
            delta = {"type": "text_delta", "text": out.text}
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        if out.finished:
            events.extend(self._end(out))
        return events

    def _end(self, last: RequestOutput) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self._block_open:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(last), "stop_sequence": _matched(last)},
            "usage": self.usage(last),
        }
        if last.finish_detail is not None:
            delta["rillet_finish_detail"] = last.finish_detail
        events.append(("message_delta", delta))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def answer(self, result: RequestOutput) -> dict[str, Any]:
        """The whole message for a merged generation (the same content as the stream's)."""
        content = [{"type": "text", "text": result.text}] if result.text else []
        return self.message(content, result)


def _matched(out: RequestOutput) -> str | None:
    return out.stop_sequence if stop_reason(out) == "stop_sequence" else None


PING: tuple[str, dict[str, Any]] = ("ping", {"type": "ping"})
