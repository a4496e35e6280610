"""Anthropic's Messages out: stream events, the whole message and errors (no transport).

The stream, in the order Anthropic's SDK insists on (``MessageStream`` raises unless
``message_start`` comes first; blocks are appended, so they go in index order):
``message_start`` (usage with the prompt's tokens and 0 output tokens, as vLLM), then the
text block (``content_block_start``, ``text_delta`` per output, ``content_block_stop``),
opened with the first text, so an empty answer has no block, as its whole message has no
content; then ``message_delta`` (``stop_reason``, ``stop_sequence``, the *cumulative*
``usage.output_tokens``, which the SDK takes as the total), then ``message_stop``. The
transport names each event (``event:`` lines) and sends ``ping`` as the keep-alive.

With tools, the text goes through the tool-call parser (``tool_calls.py``): each call is a
``tool_use`` block of its own, opened with ``{"type": "tool_use", "id": "toolu_...", "name",
"input": {}}`` as soon as its name is known, then an ``input_json_delta`` per fragment of its
arguments as they are generated (the SDK joins the ``partial_json`` and parses it), closed
when the call ends; text before (or between) calls is a text block of its own. The whole
message has each call's ``input`` parsed.

``stop_reason``: ``end_turn`` (end of sequence, or a stop token), ``tool_use`` (the turn ended
after a call), ``max_tokens`` (the cap, or the request's timeout: then
``rillet_finish_detail: "timeout"`` as on the other doors), ``stop_sequence`` with the
client's sequence that matched. With ``X-Rillet-Timing: 1`` every event ends with
``rillet_timing`` (``server/timing.py``); ``message_delta`` has the summary.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from rillet.errors import RilletError
from rillet.protocol import FinishReason, RequestOutput
from rillet.server.dialects.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Event,
    ToolCallParser,
)
from rillet.server.dialects.tools import ToolPlan
from rillet.server.timing import TIMING_KEY, StreamTiming

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

    def __init__(
        self,
        model_name: str,
        request_id: str,
        num_prompt_tokens: int,
        tools: ToolPlan | None = None,
        timing: StreamTiming | None = None,
    ) -> None:
        self.id = f"msg_{request_id}"
        self.model_name = model_name
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.tools = tools
        self.timing = timing
        self._calls: ToolCallParser | None = None
        if tools is not None and tools.parse:
            self._calls = tools.parser()
        #: The message's content so far; a tool_use block's ``input`` is its JSON text
        #: until the message is whole.
        self._blocks: list[dict[str, Any]] = []
        self._block_open = False

    def message(self, content: list[dict[str, Any]], last: RequestOutput | None) -> dict[str, Any]:
        """The message object: empty and unfinished for ``message_start``, whole at the end."""
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model_name,
            "content": content,
            "stop_reason": None if last is None else self._stop_reason(last),
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
        start = {"type": "message_start", "message": self.message([], None)}
        if self.timing is not None:
            start[TIMING_KEY] = self.timing.stamp(None, final=False, tokens=0)
        return [("message_start", start)]

    def events(self, out: RequestOutput) -> list[tuple[str, dict[str, Any]]]:
        """The named events for one engine output; the last output closes the message.

        With timing, each event ends with ``rillet_timing``: the first of an output's events
        delivers its tokens, ``message_delta`` (the stop reason) has the summary.
        """
        pieces: list[Event]
        if self._calls is None:
            pieces = [Content(out.text)] if out.text else []
        else:
            pieces = self._calls.feed(out.text)
            if out.finished:
                pieces += self._calls.finish()
        events = []
        for piece in pieces:
            events += self._piece(piece)
        if out.finished:
            events += self._end(out)
        if self.timing is not None:
            for name, event in events:
                event[TIMING_KEY] = self.timing.stamp(out, final=name == "message_delta")
        return events

    def _piece(self, piece: Event) -> list[tuple[str, dict[str, Any]]]:
        """The events of one piece of the answer: text goes in a text block (a new one
        after a call), each call in a ``tool_use`` block of its own."""
        events = []
        index = len(self._blocks) - 1
        if isinstance(piece, Content):
            if not self._block_open or self._blocks[-1]["type"] != "text":
                events += self._close()
                events.append(self._open({"type": "text", "text": ""}))
                index += 1
            self._blocks[-1]["text"] += piece.text
            delta = {"type": "text_delta", "text": piece.text}
            events.append(_delta(index, delta))
        elif isinstance(piece, CallStart):
            events += self._close()
            block = {"type": "tool_use", "id": _tool_use_id(), "name": piece.name, "input": {}}
            events.append(self._open(block))
            self._blocks[-1]["input"] = ""
        elif isinstance(piece, CallArguments):
            self._blocks[-1]["input"] += piece.fragment
            events.append(
                _delta(index, {"type": "input_json_delta", "partial_json": piece.fragment})
            )
        else:  # CallEnd
            events += self._close()
        return events

    def _open(self, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self._blocks.append(dict(block))
        self._block_open = True
        index = len(self._blocks) - 1
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return "content_block_start", start

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if not self._block_open:
            return []
        self._block_open = False
        stop = {"type": "content_block_stop", "index": len(self._blocks) - 1}
        return [("content_block_stop", stop)]

    def _end(self, last: RequestOutput) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(last), "stop_sequence": _matched(last)},
            "usage": self.usage(last),
        }
        if last.finish_detail is not None:
            delta["rillet_finish_detail"] = last.finish_detail
        events.append(("message_delta", delta))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _stop_reason(self, last: RequestOutput) -> str:
        """``tool_use`` when the model ended its turn after calling (a call cut short by
        the cap stays ``max_tokens``)."""
        reason = stop_reason(last)
        called = any(block["type"] == "tool_use" for block in self._blocks)
        return "tool_use" if called and reason == "end_turn" else reason

    def content(self) -> list[dict[str, Any]]:
        """The message's content so far, each ``tool_use`` block with its ``input`` object
        (``{}`` for arguments cut short, which do not parse)."""
        return [_whole(block) for block in self._blocks]

    def answer(self, result: RequestOutput) -> dict[str, Any]:
        """The whole message for a merged generation: the content its stream would have."""
        renderer = AnthropicRenderer(
            self.model_name, self.request_id, self.num_prompt_tokens, self.tools
        )
        renderer.events(result)
        return renderer.message(renderer.content(), result)


def _delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _whole(block: dict[str, Any]) -> dict[str, Any]:
    if block["type"] != "tool_use":
        return dict(block)
    try:
        value = json.loads(block["input"])
    except ValueError:
        value = None
    return {**block, "input": value if isinstance(value, dict) else {}}


_ID_ALPHABET = string.ascii_letters + string.digits


def _tool_use_id() -> str:
    """Anthropic's form: ``toolu_`` and 24 letters and digits."""
    return "toolu_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _matched(out: RequestOutput) -> str | None:
    return out.stop_sequence if stop_reason(out) == "stop_sequence" else None


PING: tuple[str, dict[str, Any]] = ("ping", {"type": "ping"})
