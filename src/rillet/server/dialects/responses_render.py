"""OpenAI's Responses out: the Response object, stream events and in-stream errors.

The stream (types from openai-python's ``types/responses``; the order vLLM emits): every
event carries ``sequence_number``, counting from 0 across the stream.

    response.created, response.in_progress                 (status in_progress, output [])
    response.output_item.added      a message item, status in_progress, content []
    response.content_part.added     an output_text part with text ""
    response.output_text.delta      one per output with text (logprobs [])
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed | response.incomplete               the whole Response

Without tools the item and its part open before the first token, so the SDK's stream helper
(which appends items by position and needs the part before a delta) always has them.

With tools, the text goes through the tool-call parser (``tool_calls.py``) and the output
is items in the order the model wrote them: text in a message item (opened with its first
text; an answer with neither text nor calls still has an empty one), each call a
``function_call`` item of its own::

    response.output_item.added      {"type": "function_call", "id": "fc_...", "call_id":
                                     "call_...", "name", "arguments": "", "status":
                                     "in_progress"}, as soon as the name is known
    response.function_call_arguments.delta   item_id, output_index, delta (per fragment)
    response.function_call_arguments.done    item_id, output_index, name, arguments
    response.output_item.done       the whole item, status completed

An item the end cuts short (a call or text at the cap) ends with the Response's status.
With ``X-Rillet-Timing: 1`` every event ends with ``rillet_timing`` (``server/timing.py``);
the last one has the summary.
``response.incomplete`` ends a stream the cap cut (``incomplete_details.reason``
``max_output_tokens``; a request's own timeout too, with ``rillet_finish_detail``), as
OpenAI documents it. A failure after the stream began is an ``error`` event in its typed
shape (``code``, ``message``, ``param`` at the top level: no ``error`` key, which the SDK
would raise on mid-iteration) and then ``response.failed`` with the Response's ``error``.
"""

from __future__ import annotations

import time
from typing import Any

from rillet.errors import RilletError
from rillet.protocol import FinishReason, RequestOutput
from rillet.server.dialects.openai_render import call_id as _call_id
from rillet.server.dialects.responses import ResponsesPlan
from rillet.server.dialects.tool_calls import CallArguments, CallStart, Content
from rillet.server.dialects.tool_calls import Event as Piece
from rillet.server.timing import TIMING_KEY, StreamTiming

Event = tuple[str, dict[str, Any]]


class ResponsesRenderer:
    """One request's Response object and events; it numbers the events it makes."""

    def __init__(
        self,
        model_name: str,
        planned: ResponsesPlan,
        request_id: str,
        timing: StreamTiming | None = None,
    ) -> None:
        self.id = f"resp_{request_id}"
        self.request_id = request_id
        self.model_name = model_name
        self.plan = planned
        self.timing = timing
        self.created_at = int(time.time())
        tools = planned.tools
        self._calls = tools.parser() if tools and tools.parse else None
        #: The output items so far (``text``/``arguments`` as they grow); the last may be open.
        self._items: list[dict[str, Any]] = []
        self._open = False
        self._sequence = 0

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        last: RequestOutput | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Response object: ``in_progress`` with no output, or finished."""
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        response: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model_name,
            "output": output,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "truncation": "disabled",
            **self.plan.echo,
            "usage": None if last is None else _usage(last),
        }
        if last is not None and last.finish_detail is not None:
            response["rillet_finish_detail"] = last.finish_detail
        return response

    def output(self) -> list[dict[str, Any]]:
        """The output items as they stand."""
        return [_wire(item) for item in self._items]

    def answer(self, result: RequestOutput) -> dict[str, Any]:
        """The whole Response of a merged generation (non-streamed): the one its stream
        would end with."""
        renderer = ResponsesRenderer(self.model_name, self.plan, self.request_id)
        renderer.created_at = self.created_at
        renderer.start()
        return renderer.events(result)[-1][1]["response"]

    # ---- the stream -------------------------------------------------------------------

    def start(self) -> list[Event]:
        """The Response's first events; without tools the message and its part open too."""
        events = [
            self._event("response.created", response=self.response("in_progress", [])),
            self._event("response.in_progress", response=self.response("in_progress", [])),
        ]
        if self._calls is None:
            events += self._open_message()
        if self.timing is not None:
            for _, event in events:
                event[TIMING_KEY] = self.timing.stamp(None, final=False, tokens=0)
        return events

    def events(self, out: RequestOutput) -> list[Event]:
        """The events for one engine output; the last one closes the items and the Response.

        With timing, each event ends with ``rillet_timing``: the first of an output's events
        delivers its tokens, the ``response.completed``/``incomplete`` has the summary.
        """
        pieces: list[Piece]
        tail: list[Piece] = []
        if self._calls is None:
            pieces = [Content(out.text)] if out.text else []
        else:
            pieces = self._calls.feed(out.text)
            if out.finished:
                tail = self._calls.finish()
        events: list[Event] = []
        for piece in pieces:
            events += self._piece(piece, "completed")
        if out.finished:
            status = _status(out)
            for piece in tail:  # what the end cut short ends with the Response's status
                events += self._piece(piece, status)
            if not self._items:
                events += self._open_message()
            events += self._close(status)
            final = self.response(status, self.output(), out)
            events.append(self._event(f"response.{status}", response=final))
        if self.timing is not None:
            for i, (_, event) in enumerate(events):
                final_event = out.finished and i == len(events) - 1
                event[TIMING_KEY] = self.timing.stamp(out, final=final_event)
        return events

    def failure(self, code: str, message: str) -> list[Event]:
        """An ``error`` event, then ``response.failed`` (what was generated stays in it)."""
        error = {"code": code, "message": message}
        if self._open:
            self._items[-1]["status"] = "incomplete"
        output = self.output()
        return [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self.response("failed", output, error=error)),
        ]

    def failure_of(self, exc: RilletError) -> list[Event]:
        return self.failure(exc.error_type, exc.message)

    # ---- the items ----------------------------------------------------------------------

    def _piece(self, piece: Piece, status: str) -> list[Event]:
        """The events of one piece of the answer: text goes in a message item (a new one
        after a call), each call in a ``function_call`` item of its own."""
        events = []
        if isinstance(piece, Content):
            if not self._open or self._items[-1]["type"] != "message":
                events += self._close("completed")
                events += self._open_message()
            self._items[-1]["text"] += piece.text
            events.append(
                self._event(
                    "response.output_text.delta", **self._where(), delta=piece.text, logprobs=[]
                )
            )
        elif isinstance(piece, CallStart):
            events += self._close("completed")
            call = {
                "type": "function_call",
                "id": f"fc_{self.request_id}_{piece.index}",
                "call_id": _call_id(),
                "name": piece.name,
                "arguments": "",
                "status": "in_progress",
            }
            events.append(self._add(call))
        elif isinstance(piece, CallArguments):
            self._items[-1]["arguments"] += piece.fragment
            where = self._where()
            del where["content_index"]
            events.append(
                self._event("response.function_call_arguments.delta", **where, delta=piece.fragment)
            )
        else:  # CallEnd
            events += self._close(status)
        return events

    def _add(self, item: dict[str, Any]) -> Event:
        self._items.append(item)
        self._open = True
        index = len(self._items) - 1
        return self._event("response.output_item.added", output_index=index, item=_wire(item))

    def _open_message(self) -> list[Event]:
        count = sum(item["type"] == "message" for item in self._items)
        item_id = f"msg_{self.request_id}" + (f"_{count}" if count else "")
        message = {"type": "message", "id": item_id, "status": "in_progress", "text": ""}
        empty_part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._add(message),
            self._event("response.content_part.added", **self._where(), part=empty_part),
        ]

    def _close(self, status: str) -> list[Event]:
        """The open item's closing events, with its final status."""
        if not self._open:
            return []
        self._open = False
        item = self._items[-1]
        item["status"] = status
        where = self._where()
        index = where["output_index"]
        if item["type"] == "message":
            part = _part(item)
            events = [
                self._event("response.output_text.done", **where, text=item["text"], logprobs=[]),
                self._event("response.content_part.done", **where, part=part),
            ]
        else:
            done = {
                "item_id": item["id"],
                "output_index": index,
                "name": item["name"],
                "arguments": item["arguments"],
            }
            events = [self._event("response.function_call_arguments.done", **done)]
        events.append(
            self._event("response.output_item.done", output_index=index, item=_wire(item))
        )
        return events

    def _where(self) -> dict[str, Any]:
        """The last item's ``item_id``, ``output_index`` and (its one part's) ``content_index``."""
        index = len(self._items) - 1
        return {"item_id": self._items[index]["id"], "output_index": index, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return kind, event


def _wire(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the wire has it (a copy: later events do not change it)."""
    if item["type"] == "function_call":
        return dict(item)
    content = [] if item["status"] == "in_progress" else [_part(item)]
    return {
        "type": "message",
        "id": item["id"],
        "role": "assistant",
        "status": item["status"],
        "content": content,
    }


def _part(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "output_text", "text": item["text"], "annotations": [], "logprobs": []}


def _status(out: RequestOutput) -> str:
    return "incomplete" if out.finish_reason is FinishReason.LENGTH else "completed"


def _usage(out: RequestOutput) -> dict[str, Any]:
    return {
        "input_tokens": out.num_prompt_tokens,
        "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
        "output_tokens": out.num_generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": out.num_prompt_tokens + out.num_generated_tokens,
    }
