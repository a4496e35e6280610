"""OpenAI's Responses out: the Response object, stream events and in-stream errors.

The stream (types from openai-python's ``types/responses``; the order vLLM emits): every
event carries ``sequence_number``, counting from 0 across the stream.

    response.created, response.in_progress                 (status in_progress, output [])
    response.output_item.added      a message item, status in_progress, content []
    response.content_part.added     an output_text part with text ""
    response.output_text.delta      one per output with text (logprobs [])
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed | response.incomplete               the whole Response

The item and its part open before the first token, so the SDK's stream helper (which
appends items by position and needs the part before a delta) always has them.
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
from rillet.server.dialects.responses import ResponsesPlan

Event = tuple[str, dict[str, Any]]


class ResponsesRenderer:
    """One request's Response object and events; it numbers the events it makes."""

    def __init__(self, model_name: str, planned: ResponsesPlan, request_id: str) -> None:
        self.id = f"resp_{request_id}"
        self.item_id = f"msg_{request_id}"
        self.model_name = model_name
        self.plan = planned
        self.created_at = int(time.time())
        self.text = ""
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

    def message_item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part()]
        return {
            "type": "message",
            "id": self.item_id,
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def answer(self, result: RequestOutput) -> dict[str, Any]:
        """The whole Response of a merged generation (non-streamed)."""
        self.text = result.text
        status = _status(result)
        return self.response(status, [self.message_item(status)], result)

    # ---- the stream -------------------------------------------------------------------

    def start(self) -> list[Event]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        empty_part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._event("response.created", response=self.response("in_progress", [])),
            self._event("response.in_progress", response=self.response("in_progress", [])),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self.message_item("in_progress"),
            ),
            self._event("response.content_part.added", **where, part=empty_part),
        ]

    def events(self, out: RequestOutput) -> list[Event]:
        """The events for one engine output; the last one closes the item and the Response."""
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        events = []
        if out.text:
            self.text += out.text
            events.append(
                self._event("response.output_text.delta", **where, delta=out.text, logprobs=[])
            )
        if out.finished:
            status = _status(out)
            item = self.message_item(status)
            events += [
                self._event("response.output_text.done", **where, text=self.text, logprobs=[]),
                self._event("response.content_part.done", **where, part=self.part()),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(f"response.{status}", response=self.response(status, [item], out)),
            ]
        return events

    def failure(self, code: str, message: str) -> list[Event]:
        """An ``error`` event, then ``response.failed`` (what was generated stays in it)."""
        error = {"code": code, "message": message}
        item = self.message_item("incomplete")
        return [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self.response("failed", [item], error=error)),
        ]

    def failure_of(self, exc: RilletError) -> list[Event]:
        return self.failure(exc.error_type, exc.message)

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return kind, event


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
