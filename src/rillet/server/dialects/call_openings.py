"""Where a tool call begins when the model did not write ``<tool_call>`` (pure).

Small models trained on Hermes's format often write the call as a Markdown code block
instead. Qwen2.5-Coder-1.5B, asked "What is the weather like in Paris right now? Use the
tool." with a ``get_weather`` tool, greedy, answers (measured)::

    ```json
    {
      "name": "get_weather",
      "arguments": {
        "city": "Paris",
        "unit": "celsius"
      }
    }
    ```

llama.cpp's Hermes-2-Pro parser takes such a block (``json``, ``xml`` or no language) and a
bare ``{"name": ...}`` as a call, and triggers its tool grammar on them; vLLM's hermes
parser takes only ``<tool_call>``, so that answer stays text there. rillet takes them when
the name is one of the request's tools (a JSON answer about someone called "Bob" stays
text): the fenced form anywhere, the bare form only as the first thing the model writes.

:func:`match_opening` tells, for text that starts where an opening might, whether it is
one (and how long), could still become one (the text must be held back), or is not one.
Each verdict but PARTIAL stays the same however much more text arrives, which is what
makes the parser's events independent of how the text is split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

#: A step of an opening: ``("one", options)`` one of the strings, ``("opt", options)`` one
#: of them or nothing, ``("ws", (characters,))`` a run of those characters.
_Step = tuple[str, tuple[str, ...]]

_SPACE: _Step = ("ws", (" \t",))
_WS: _Step = ("ws", (" \t\r\n",))
FENCE = "```"
_FENCE: list[_Step] = [
    ("one", (FENCE,)),
    ("opt", ("json", "JSON", "xml")),
    _SPACE,
    ("one", ("\n",)),
    _WS,
]
#: After the name: the arguments' key (the value is the call's arguments), or the end of
#: a call without arguments.
_ARGUMENTS: list[_Step] = [
    _WS,
    ("one", (",",)),
    _WS,
    ("one", ('"arguments"', '"parameters"')),
    _WS,
    ("one", (":",)),
]
_NO_ARGUMENTS: list[_Step] = [_WS, ("one", ("}",))]
#: What may close a fenced call after its object's ``}``.
FENCE_CLOSE: list[_Step] = [_WS, ("one", (FENCE,))]


class Verdict(Enum):
    NO = "no"
    PARTIAL = "partial"
    FULL = "full"


@dataclass(frozen=True)
class Opening:
    """A complete opening: ``size`` characters, through ``"arguments":`` or the ``}`` of
    a call without arguments."""

    size: int
    name: str
    has_arguments: bool


def match_opening(text: str, names: Sequence[str], fenced: bool) -> tuple[Verdict, Opening | None]:
    """Does ``text`` start with a call of one of ``names`` (in a code block if ``fenced``)?"""
    head: list[_Step] = [
        ("one", ("{",)),
        _WS,
        ("one", ('"name"',)),
        _WS,
        ("one", (":",)),
        _WS,
        ("one", tuple(f'"{name}"' for name in names)),
    ]
    if not fenced:
        head.insert(0, _WS)
    prefix = (_FENCE if fenced else []) + head
    partial = False
    for tail, has_arguments in ((_ARGUMENTS, True), (_NO_ARGUMENTS, False)):
        verdict, size, picked = walk(text, prefix + tail)
        if verdict is Verdict.FULL:
            return verdict, Opening(size, _picked_name(picked, names), has_arguments)
        partial = partial or verdict is Verdict.PARTIAL
    return (Verdict.PARTIAL if partial else Verdict.NO), None


def _picked_name(picked: Sequence[str], names: Sequence[str]) -> str:
    """The name the head's last step took (its options are the quoted names)."""
    quoted = {f'"{name}"': name for name in names}
    return next(quoted[p] for p in picked if p in quoted)


def walk(text: str, steps: Sequence[_Step]) -> tuple[Verdict, int, list[str]]:
    """Match ``steps`` at the start of ``text``: the verdict, the characters matched (when
    FULL) and the string each ``one``/``opt`` step took."""
    at = 0
    picked: list[str] = []
    for kind, options in steps:
        rest = text[at:]
        if kind == "ws":
            at += len(rest) - len(rest.lstrip(options[0]))
            continue
        found = next((option for option in options if rest.startswith(option)), None)
        if found is not None:
            at += len(found)
            picked.append(found)
        elif any(option.startswith(rest) for option in options):
            return Verdict.PARTIAL, 0, picked  # the text ends inside this step
        elif kind == "opt":
            picked.append("")
        else:
            return Verdict.NO, 0, picked
    return Verdict.FULL, at, picked
