"""OpenAI's JSON out: chunks, whole answers and errors, as vLLM sends them.

``serving_chat.py`` / ``serving_completion.py`` shapes: a stable ``chatcmpl-``/``cmpl-`` id,
a first chat chunk ``{"role":"assistant","content":""}`` sent with the first engine output,
content-only deltas, ``finish_reason`` on the last one, and a ``choices: []`` usage chunk
only when ``stream_options.include_usage``. With ``continuous_usage_stats`` every chunk carries
the cumulative ``usage`` after its ``choices`` (the role chunk's has 0 completion tokens), as
vLLM's ``serving_chat.py`` / ``serving_completion.py`` send it. A request its timeout ended
has ``finish_reason: "length"`` and ``"rillet_finish_detail": "timeout"`` at the top level of
its last chunk (and of the answer). With ``X-Rillet-Timing: 1`` every chunk ends with
``rillet_timing`` (``server/timing.py``; the role and usage chunks deliver 0 tokens) and the
chunk with the finish reason has the summary. The transport adds ``data: [DONE]``.

With tools, the text goes through the tool-call parser and calls stream as OpenAI streams
them: per call a first delta with ``index``, ``id``, ``type`` and ``function.name`` (and
``arguments: ""``), then ``function.arguments`` fragments as they are generated, and at the
end a ``delta: {}`` chunk with ``finish_reason: "tool_calls"``. The whole answer has
``message.tool_calls`` and ``content: null`` when the model said nothing else.
"""

from __future__ import annotations

import secrets
import string
import time
from typing import TYPE_CHECKING, Any

from rillet.errors import RilletError
from rillet.protocol import GeneratedToken, RequestOutput
from rillet.server.dialects.fields import clean_logprob
from rillet.server.dialects.openai import OpenAIPlan
from rillet.server.dialects.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Event,
    ToolCallParser,
)
from rillet.server.timing import TIMING_KEY, StreamTiming

if TYPE_CHECKING:
    from rillet.tokenizer import Tokenizer


def status(exc: RilletError) -> int:
    """OpenAI and vLLM answer bad input with 400 (TGI's 422 is kept on TGI's routes)."""
    return 400 if exc.http_status == 422 else exc.http_status


def error_body(exc: RilletError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": None,
            "code": status(exc),
        }
    }


class OpenAIRenderer:
    """The fields every chunk and answer of one request repeats, and their shapes."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_name: str,
        planned: OpenAIPlan,
        request_id: str,
        timing: StreamTiming | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.timing = timing
        self.model_name = model_name
        self.plan = planned
        self.chat = planned.chat
        self.id = f"chatcmpl-{request_id}" if self.chat else f"cmpl-{request_id}"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())
        self._text_offset = len(planned.echo)
        self._started = False
        tools = planned.tools
        self._calls: ToolCallParser | None = None
        if self.chat and tools is not None and tools.parse:
            self._calls = tools.parser()
        self._call_ids: list[str] = []

    def envelope(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            **fields,
        }

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The chunks for one engine output (the first carries the role, or the echo)."""
        chunks = []
        text = out.text
        if not self._started:
            self._started = True
            if self.chat:
                delta = {"role": "assistant", "content": ""}
                first = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                chunks.append(self._timed(self._chunk([first], out.num_prompt_tokens, 0), out, 0))
            text = self.plan.echo + text
        finish = out.finish_reason.to_openai() if out.finish_reason else None
        if self._calls is not None:
            return chunks + self._tool_chunks(out, finish)
        if text or finish or (self.plan.logprobs and out.tokens):
            choice = self.choice(text, out.tokens, finish)
            chunk = self._chunk([choice], out.num_prompt_tokens, out.num_generated_tokens)
            if out.finish_detail is not None:
                chunk["rillet_finish_detail"] = out.finish_detail
            chunks.append(self._timed(chunk, out, None, final=finish is not None))
        return chunks

    def _timed(
        self, chunk: dict[str, Any], out: RequestOutput, tokens: int | None, final: bool = False
    ) -> dict[str, Any]:
        """``chunk`` with ``rillet_timing`` last, when the request asked for timing."""
        if self.timing is not None:
            chunk[TIMING_KEY] = self.timing.stamp(out, final=final, tokens=tokens)
        return chunk

    def _chunk(
        self, choices: list[dict[str, Any]], num_prompt: int, num_generated: int
    ) -> dict[str, Any]:
        """A stream chunk; with continuous usage, the counts so far after its choices."""
        if self.plan.continuous_usage:
            usage = self.usage(num_prompt, num_generated)
            return self.envelope(self.object, choices=choices, usage=usage)
        return self.envelope(self.object, choices=choices)

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        usage = self.usage(last.num_prompt_tokens, last.num_generated_tokens)
        return self._timed(self.envelope(self.object, choices=[], usage=usage), last, 0)

    def answer(self, result: RequestOutput) -> dict[str, Any]:
        """The whole ``chat.completion`` / ``text_completion`` for a merged generation."""
        assert result.finish_reason is not None
        choice = self.choice(
            self.plan.echo + result.text, result.tokens, result.finish_reason.to_openai()
        )
        obj = "text_completion"
        if self.chat:
            message = {"role": "assistant", "content": choice.pop("delta")["content"]}
            if self._calls is not None:
                message, choice["finish_reason"] = self._tool_message(
                    message["content"], choice["finish_reason"]
                )
            choice = {"index": 0, "message": message, **choice}
            obj = "chat.completion"
        usage = self.usage(result.num_prompt_tokens, result.num_generated_tokens)
        answer = self.envelope(obj, choices=[choice], usage=usage)
        if result.finish_detail is not None:
            answer["rillet_finish_detail"] = result.finish_detail
        return answer

    def choice(self, text: str, tokens: list[GeneratedToken], finish: str | None) -> dict[str, Any]:
        logprobs = self.logprobs(tokens) if self.plan.logprobs else None
        if self.chat:
            return {
                "index": 0,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, tokens: list[GeneratedToken]) -> dict[str, Any]:
        raw = [self.tokenizer.decode([t.id], skip_special_tokens=False) for t in tokens]
        if self.chat:  # {"content": [{token, logprob, bytes, top_logprobs}]}
            return {
                "content": [
                    {
                        **_logprob_entry(text, t.logprob),
                        "top_logprobs": [_logprob_entry(a.text, a.logprob) for a in t.top],
                    }
                    for t, text in zip(tokens, raw, strict=True)
                ]
            }
        offsets = []  # completions' legacy shape
        for t in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(t.text)
        return {
            "text_offset": offsets,
            "token_logprobs": [clean_logprob(t.logprob) for t in tokens],
            "tokens": raw,
            "top_logprobs": [{a.text: clean_logprob(a.logprob) for a in t.top} for t in tokens],
        }

    # ---- tool calls -----------------------------------------------------------------------

    def _tool_chunks(self, out: RequestOutput, finish: str | None) -> list[dict[str, Any]]:
        """One chunk per content piece, call start and run of argument fragments; the
        output's logprobs on the last; ``finish_reason`` on a ``delta: {}`` of its own."""
        assert self._calls is not None
        events = self._calls.feed(out.text)
        if finish:
            events += self._calls.finish()
        choices: list[dict[str, Any]] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            for delta in map(self._delta, events)
            if delta
        ]
        if self.plan.logprobs and out.tokens:
            if not choices:
                choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": None})
            choices[-1]["logprobs"] = self.logprobs(out.tokens)
        if finish:
            finish = self._tool_finish(finish)
            choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
        made = [
            self._chunk([choice], out.num_prompt_tokens, out.num_generated_tokens)
            for choice in choices
        ]
        if made and out.finish_detail is not None:
            made[-1]["rillet_finish_detail"] = out.finish_detail
        # The output's tokens are delivered by its first chunk; the last has the summary.
        last = len(made) - 1
        return [
            self._timed(chunk, out, None, final=finish is not None and i == last)
            for i, chunk in enumerate(made)
        ]

    def _delta(self, event: Event) -> dict[str, Any]:
        if isinstance(event, Content):
            return {"content": event.text}
        if isinstance(event, CallStart):
            self._call_ids.append(call_id())
            call = {
                "index": event.index,
                "id": self._call_ids[event.index],
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return {"tool_calls": [call]}
        if isinstance(event, CallArguments):
            fragment = {"index": event.index, "function": {"arguments": event.fragment}}
            return {"tool_calls": [fragment]}
        return {}  # CallEnd: OpenAI sends nothing for it

    def _tool_message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """The answer's message, its text parsed for calls, and its finish reason."""
        assert self._calls is not None
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        for event in self._calls.feed(text) + self._calls.finish():
            if isinstance(event, Content):
                content.append(event.text)
            elif isinstance(event, CallStart):
                self._call_ids.append(call_id())
                function = {"name": event.name, "arguments": ""}
                calls.append({"id": self._call_ids[-1], "type": "function", "function": function})
            elif isinstance(event, CallArguments):
                calls[event.index]["function"]["arguments"] += event.fragment
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = calls
        elif message["content"] is None:
            message["content"] = ""
        return message, self._tool_finish(finish)

    def _tool_finish(self, finish: str) -> str:
        """``tool_calls`` when the model ended its turn after calling (a cut-short answer
        stays ``length``, as OpenAI's does)."""
        return "tool_calls" if self._call_ids and finish == "stop" else finish

    @staticmethod
    def usage(num_prompt: int, num_generated: int) -> dict[str, int]:
        return {
            "prompt_tokens": num_prompt,
            "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated,
        }


_ID_ALPHABET = string.ascii_letters + string.digits


def call_id() -> str:
    """OpenAI's form: ``call_`` and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _logprob_entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": clean_logprob(logprob), "bytes": list(text.encode())}
