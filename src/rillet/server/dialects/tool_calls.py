"""Tool calls out of generated text, incrementally: text deltas in, events out (pure).

The call format is Hermes's, which Qwen2.5 (and Qwen3) are trained on and which rillet's
fallback tool prompt asks every other model for (``rillet.chat_tools``)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

:class:`ToolCallParser` turns the text of a generation, in whatever pieces it arrives
(one token, many tokens, a marker split anywhere), into :data:`Event` s: content text,
a call's start (its name, as soon as it is known), fragments of its ``arguments`` JSON as
they are generated, and its end. Feeding the whole text at once gives the same events,
merged, as feeding it in pieces; that is how the non-streamed answer is built.

What it holds back, and why:

* a tail of content that could still be the start of ``<tool_call>`` (else ``<tool``
  leaks as content and the call is lost: vLLM #57490);
* trailing whitespace of content, which either precedes a call (and is dropped, as the
  newlines between parallel calls are) or is sent with the next text;
* a call's head until its name is complete: a call's first delta carries the whole name.

A call whose head is not ``{"name": ..., "arguments": ...}`` in that order is buffered to
its end tag and parsed whole; one that is not JSON at all is given back as content, so no
generated text is ever lost.

Given the request's tool ``names``, it also takes the openings llama.cpp's Hermes parser
takes (``call_openings.py``): a Markdown code block holding ``{"name": "<a tool>", ...}``,
anywhere, and such an object bare as the first thing written. What it holds back grows by
a tail that could still become one (a code fence, until its first key or name rules it out).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rillet.server.dialects.call_openings import (
    FENCE_CLOSE,
    Opening,
    Verdict,
    match_opening,
    walk,
)

START = "<tool_call>"
END = "</tool_call>"

#: The head of a call in the order the format (and rillet's grammar) writes it.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
#: A call with a name and no arguments at all: ``{"name": "f"}``.
_NAME_ONLY = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}')
_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str


@dataclass(frozen=True)
class CallEnd:
    index: int


Event = Content | CallStart | CallArguments | CallEnd


class ToolCallParser:
    """Incremental parser of one generation's text. ``feed`` each delta, then ``finish``.

    ``max_calls`` (1 when the client asked for no parallel calls): calls past it are
    parsed and dropped.
    """

    def __init__(self, max_calls: int | None = None, names: tuple[str, ...] = ()) -> None:
        """``names``: the request's tools, which a call outside ``<tool_call>`` tags must
        name to be taken as one (none: only tagged calls)."""
        self.max_calls = max_calls
        self.names = names
        self.num_calls = 0
        self._buffer = ""  # text not yet turned into events
        self._in_call = False
        self._started = False  # the current call's CallStart went out
        self._args = _ValueScanner()
        self._args_done = False
        self._args_sent = False  # some of the current call's arguments went out
        self._form = "tag"  # how the current call opened: "tag", "fence" or "bare"
        self._object: _ValueScanner | None = None  # finds the ``}`` of an untagged call
        self._wrote_text = False  # something but whitespace came before the buffer

    def feed(self, text: str) -> list[Event]:
        """The events that ``text`` (the next piece of the generation) completes."""
        self._buffer += text
        events: list[Event] = []
        while True:
            progressed = self._call_step(events) if self._in_call else self._text_step(events)
            if not progressed:
                return _merged(events)

    def finish(self) -> list[Event]:
        """The events of what is still held back once the generation has ended.

        An unterminated call that had started is ended (its arguments may be cut short, as
        when the generation hit its length limit); one that never got its name is content.
        """
        events = self.feed("")
        if self._in_call:
            if self._started:
                self._close_call(events)
            else:
                events.append(Content(START + self._buffer))
        elif self._buffer.strip(_WHITESPACE) or (self._buffer and not self.num_calls):
            events.append(Content(self._buffer))
        self._buffer = ""
        self._in_call = False
        return _merged(events)

    # ---- content ------------------------------------------------------------------------

    def _text_step(self, events: list[Event]) -> bool:
        at = self._buffer.find(START)
        held, opening, fenced = self._untagged_opening(len(self._buffer) if at < 0 else at)
        if opening is not None or at >= 0:
            cut = held if opening is not None else at
            before = self._buffer[:cut]
            if before.strip(_WHITESPACE):
                events.append(Content(before.rstrip(_WHITESPACE)))
                self._wrote_text = True
            self._open_call()
            if opening is None:
                self._buffer = self._buffer[at + len(START) :]
            else:
                self._buffer = self._buffer[cut + opening.size :]
                self._open_untagged(events, opening, fenced)
            return True
        overlap = _marker_overlap(self._buffer, START)
        hold = min(held, len(self._buffer) - overlap)
        keep = len(self._buffer) - hold + _trailing_whitespace(self._buffer[:hold])
        ready = self._buffer[: len(self._buffer) - keep]
        if ready:
            events.append(Content(ready))
            self._wrote_text = self._wrote_text or bool(ready.strip(_WHITESPACE))
            self._buffer = self._buffer[len(ready) :]
        return False

    def _untagged_opening(self, before: int) -> tuple[int, Opening | None, bool]:
        """The first place before ``before`` where an untagged call opens (with the opening)
        or could still open (with None), and whether it is fenced; ``len(buffer)`` and None
        when there is none."""
        if not self.names:
            return len(self._buffer), None, False
        starts: list[tuple[int, bool]] = []
        if not self._wrote_text and not self.num_calls:
            starts.append((0, False))  # a bare call as the first thing written
        at = self._buffer.find("`")
        while 0 <= at < before:
            if at == 0 or self._buffer[at - 1] != "`":
                starts.append((at, True))
            at = self._buffer.find("`", at + 1)
        for at, fenced in sorted(starts):
            if at >= before:
                break
            verdict, opening = match_opening(self._buffer[at:], self.names, fenced)
            if verdict is not Verdict.NO:
                return at, opening, fenced
        return len(self._buffer), None, False

    # ---- calls --------------------------------------------------------------------------

    def _open_call(self) -> None:
        self._in_call, self._started, self._args_done = True, False, False
        self._args, self._args_sent = _ValueScanner(), False
        self._form, self._object = "tag", None

    def _open_untagged(self, events: list[Event], opening: Opening, fenced: bool) -> None:
        self._form = "fence" if fenced else "bare"
        self._start(events, opening.name)
        self._args_done = not opening.has_arguments
        if opening.has_arguments:
            self._object = _ValueScanner()
            self._object.started, self._object.depth = True, 1  # inside the call's object

    def _untagged_end_step(self, events: list[Event]) -> bool:
        """Past an untagged call's arguments: its object's ``}``, then a fence's close."""
        if self._object is not None:
            _, consumed, closed = self._object.scan(self._buffer)
            self._buffer = self._buffer[consumed:]
            if not closed:
                return False
            self._object = None
        if self._form == "fence":
            verdict, size, _ = walk(self._buffer, FENCE_CLOSE)
            if verdict is Verdict.PARTIAL:
                return False
            self._buffer = self._buffer[size:]  # 0 when the block was never closed
        self._close_call(events)
        return True

    def _call_step(self, events: list[Event]) -> bool:
        if not self._started:
            return self._head_step(events)
        if not self._args_done:
            fragment, consumed, self._args_done = self._args.scan(self._buffer)
            self._buffer = self._buffer[consumed:]
            if fragment:
                self._send_arguments(events, fragment)
            if not self._args_done:
                return False
            if self._args.whole_string is not None:
                # ``"arguments": "{...}"``: the JSON was sent as a string; send the JSON.
                self._send_arguments(events, self._args.whole_string)
        if self._form != "tag":
            return self._untagged_end_step(events)
        at = self._buffer.find(END)
        if at < 0:
            return False
        self._buffer = self._buffer[at + len(END) :]
        self._close_call(events)
        return True

    def _head_step(self, events: list[Event]) -> bool:
        end = self._buffer.find(END)
        head = _HEAD.match(self._buffer)
        if head and (end < 0 or head.end() <= end):
            self._buffer = self._buffer[head.end() :]
            self._start(events, _unescape(head.group(1)))
            return True
        name_only = _NAME_ONLY.match(self._buffer)
        if name_only and (end < 0 or name_only.end() <= end):
            self._buffer = self._buffer[name_only.end() :]
            self._start(events, _unescape(name_only.group(1)))
            self._args_done = True
            return True
        if end < 0:
            return False
        body, self._buffer = self._buffer[:end], self._buffer[end + len(END) :]
        call = _whole_call(body)
        if call is None:  # not a call after all: give the text back
            self._in_call = False
            events.append(Content(START + body + END))
            return True
        self._start(events, call[0])
        self._send_arguments(events, call[1])
        self._close_call(events)
        return True

    @property
    def _wanted(self) -> bool:
        return self.max_calls is None or self.num_calls <= self.max_calls

    def _start(self, events: list[Event], name: str) -> None:
        self.num_calls += 1
        self._started = True
        if self._wanted:
            events.append(CallStart(self.num_calls - 1, name))

    def _send_arguments(self, events: list[Event], fragment: str) -> None:
        self._args_sent = True
        if self._wanted:
            events.append(CallArguments(self.num_calls - 1, fragment))

    def _close_call(self, events: list[Event]) -> None:
        """End the current call; a call with no arguments gets ``{}`` (vLLM #11392)."""
        if not self._args_sent:
            self._send_arguments(events, "{}")
        if self._wanted:
            events.append(CallEnd(self.num_calls - 1))
        self._in_call = False


class _ValueScanner:
    """Finds where one JSON value ends in text that arrives in pieces: strings and their
    escapes, nesting depth. ``scan`` returns what of a piece belongs to the value."""

    def __init__(self) -> None:
        self.started = False
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.is_string = False  # the value itself is a string (buffered, then decoded)
        self._string = ""
        self.whole_string: str | None = None

    def scan(self, text: str) -> tuple[str, int, bool]:
        """``(fragment to send, characters consumed, value complete)``."""
        out_start = None
        for i, ch in enumerate(text):
            if not self.started:
                if ch in _WHITESPACE:
                    continue
                self.started = True
                self.is_string = ch == '"'
                out_start = i
            elif out_start is None:
                out_start = i
            if self._step(ch):
                if self.is_string:
                    self._string += text[out_start : i + 1]
                    self.whole_string = _string_value(self._string)
                    return "", i + 1, True
                return text[out_start : i + 1], i + 1, True
        if out_start is None:
            return "", len(text), False
        if self.is_string:
            self._string += text[out_start:]
            return "", len(text), False
        return text[out_start:], len(text), False

    def _step(self, ch: str) -> bool:
        """Advance over ``ch``; True when it ends the value."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                return self.depth == 0
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth <= 0
        elif self.depth == 0 and ch in _WHITESPACE + ",":
            return True  # a bare number / true / false / null ended
        return False


def _string_value(text: str) -> str:
    """Arguments sent as a JSON string: the string's content when it holds JSON, else the
    string itself as JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) and _is_json(value) else json.dumps(value)


def _whole_call(body: str) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a call's body in any key order; None if it is not one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments: Any = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str) and _is_json(arguments):
        return call["name"], arguments
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _unescape(name: str) -> str:
    try:
        return str(json.loads(f'"{name}"'))
    except ValueError:
        return name


def _marker_overlap(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _trailing_whitespace(text: str) -> int:
    return len(text) - len(text.rstrip(_WHITESPACE))


def _merged(events: list[Event]) -> list[Event]:
    """Adjacent content, and adjacent argument fragments of one call, as one event each."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Content) and isinstance(last, Content):
            out[-1] = Content(last.text + event.text)
        elif (
            isinstance(event, CallArguments)
            and isinstance(last, CallArguments)
            and last.index == event.index
        ):
            out[-1] = CallArguments(event.index, last.fragment + event.fragment)
        elif not (isinstance(event, Content) and not event.text):
            out.append(event)
    return out
