"""The WebSocket dialects: the Ray tutorial's chat turns, and ``/ws``'s JSON frames.

``/ws`` multiplexes generations on one socket. Client -> server, one JSON object per text
frame::

    {"type": "generate", "id": "<client's id>", "messages": [...]}   (or "prompt": "...")
    {"type": "cancel", "id": "..."}

with OpenAI's sampling fields (and vLLM's extras) at the top level of a ``generate``,
output constraints included (``response_format``, ``structured_outputs``, ``guided_*``).
Server -> client: ``{"type": "token", "id", "text", "token_ids"}`` per streamed delta
(``logprobs`` too when asked), then exactly one ``{"type": "done", "id", "finish_reason",
"usage"}`` (with ``"rillet_finish_detail": "timeout"`` when the request's ``timeout_ms``
ended it) or one ``{"type": "error", "id", "error", "error_type"}`` (the table's types;
``retry_after`` in seconds too on an ``overloaded`` one). A ``generate`` frame may carry
``max_queue_ms`` and ``timeout_ms`` (``rillet.server.deadlines``), and ``"timing": true``: then
every ``token`` frame and the ``done`` frame carry ``rillet_timing`` (``server/timing.py``),
the ``done`` frame with the summary (and the tokens of a last output that had no text).
The mapping is OpenAI's (``openai.sampling_params``), so greedy text equals the OpenAI
route's for the same messages and fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic

from rillet.errors import RilletError, ValidationError
from rillet.protocol import RequestOutput
from rillet.sampling import SamplingParams
from rillet.server.dialects.fields import clean_logprob, first_problem, json_loads
from rillet.server.dialects.openai import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ChatMessage,
    SamplingFields,
    message_dict,
    sampling_params,
    unset_fields,
)
from rillet.server.spec import ChatPrompt, GenerationSpec
from rillet.server.timing import TIMING_KEY, StreamTiming

#: What the Ray tutorial's chat client waits for after each reply.
RESPONSE_FINISHED = "<<Response Finished>>"
#: The tutorial chat's cap per reply, at most half the context (the conversation keeps the
#: rest; its oldest turns go when it would not fit).
CHAT_MAX_NEW_TOKENS = 512

FrameId = str | int | None


class GenerateFrame(SamplingFields):
    type: str
    id: str | int
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    logprobs: bool | None = None


@dataclass
class WsPlan:
    spec: GenerationSpec
    logprobs: bool


def parse_frame(text: str) -> tuple[FrameId, str, dict[str, Any]]:
    """``(id, type, frame)`` of a client frame; ValidationError if it is not one. The id is
    returned whenever the frame has one, so the error can name it."""
    try:
        frame = json_loads(text)
    except ValueError as exc:
        raise ValidationError(f"the frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ValidationError("a frame must be a JSON object")
    frame_id = frame.get("id")
    if not isinstance(frame_id, str | int) or isinstance(frame_id, bool):
        raise ValidationError("a frame needs an `id` (a string or an integer)")
    kind = frame.get("type")
    if kind not in ("generate", "cancel"):
        raise FrameError(frame_id, ValidationError(f"unknown frame type {kind!r}"))
    return frame_id, kind, frame


class FrameError(Exception):
    """A RilletError about a frame whose id is known."""

    def __init__(self, frame_id: FrameId, error: RilletError) -> None:
        super().__init__(error.message)
        self.frame_id = frame_id
        self.error = error


def plan_generate(frame: dict[str, Any]) -> WsPlan:
    """A ``generate`` frame -> what to run (ValidationError on a bad frame)."""
    try:
        body = GenerateFrame.model_validate(frame)
    except pydantic.ValidationError as exc:
        raise ValidationError(first_problem(exc, "frame")) from None
    if (body.messages is None) == (body.prompt is None):
        raise ValidationError("a `generate` frame needs exactly one of `messages` and `prompt`")
    params = sampling_params(body, body.max_tokens, bool(body.logprobs), 0)
    unset = unset_fields(body)
    if body.messages is not None:
        chat = ChatPrompt([message_dict(m) for m in body.messages])
        spec = GenerationSpec(chat, params, names=CHAT_FIELDS, unset=unset)
        return WsPlan(spec, bool(body.logprobs))
    assert body.prompt is not None
    spec = GenerationSpec(body.prompt, params, names=COMPLETION_FIELDS, unset=unset)
    return WsPlan(spec, bool(body.logprobs))


def chat_turn(conversation: list[dict[str, Any]], max_total_tokens: int) -> WsPlan:
    """The tutorial chat's next reply: greedy, the whole conversation through the chat
    template, the oldest turns dropped when it no longer fits the context."""
    cap = min(CHAT_MAX_NEW_TOKENS, max_total_tokens // 2)
    params = SamplingParams(max_new_tokens=cap, temperature=0.0)
    chat = ChatPrompt(list(conversation), drop_oldest_turns=True)
    return WsPlan(GenerationSpec(chat, params, names=CHAT_FIELDS), logprobs=False)


def token_frame(
    frame_id: FrameId, out: RequestOutput, logprobs: bool, timing: StreamTiming | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "token",
        "id": frame_id,
        "text": out.text,
        "token_ids": [t.id for t in out.tokens],
    }
    if logprobs:
        frame["logprobs"] = [clean_logprob(t.logprob) for t in out.tokens]
    if timing is not None:
        frame[TIMING_KEY] = timing.stamp(out, final=False)
    return frame


def done_frame(
    frame_id: FrameId,
    finish_reason: str,
    num_prompt_tokens: int,
    num_generated_tokens: int,
    finish_detail: str | None = None,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``timing``: the ``rillet_timing`` summary stamp, when the request asked for it."""
    frame: dict[str, Any] = {
        "type": "done",
        "id": frame_id,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_generated_tokens},
    }
    if finish_detail is not None:
        frame["rillet_finish_detail"] = finish_detail
    if timing is not None:
        frame[TIMING_KEY] = timing
    return frame


def error_frame(frame_id: FrameId, error: RilletError) -> dict[str, Any]:
    frame = {
        "type": "error",
        "id": frame_id,
        "error": error.message,
        "error_type": error.error_type,
    }
    if error.retry_after_s is not None:
        frame["retry_after"] = error.retry_after_s
    return frame
