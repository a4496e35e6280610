"""The incremental tool-call parser: any split of the text gives the same events."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rillet.server.dialects.tool_calls import (
    CallArguments,
    CallEnd,
    CallStart,
    Content,
    Event,
    ToolCallParser,
    _merged,
)

ONE = (
    '<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris, \\"FR\\"", "n": [1, {"a": "}"}]}}\n</tool_call>'
)
TWO = (
    "Let me check.\n"
    '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
)


def run(
    pieces: list[str], max_calls: int | None = None, names: tuple[str, ...] = ()
) -> list[Event]:
    parser = ToolCallParser(max_calls, names)
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return _merged(events)


def calls(events: list[Event]) -> list[tuple[str, str]]:
    """``(name, arguments)`` per call, checking the event order of each."""
    out: list[tuple[str, str]] = []
    open_index = None
    for e in events:
        if isinstance(e, CallStart):
            assert open_index is None and e.index == len(out)
            open_index = e.index
            out.append((e.name, ""))
        elif isinstance(e, CallArguments):
            assert e.index == open_index
            out[-1] = (out[-1][0], out[-1][1] + e.fragment)
        elif isinstance(e, CallEnd):
            assert e.index == open_index
            open_index = None
    assert open_index is None
    return out


def content(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Content))


def test_one_call_whole() -> None:
    events = run([ONE])
    assert content(events) == ""
    [(name, arguments)] = calls(events)
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": 'Paris, "FR"', "n": [1, {"a": "}"}]}


def test_text_then_two_calls() -> None:
    events = run([TWO])
    assert content(events) == "Let me check."
    assert calls(events) == [("a", '{"x": 1}'), ("b", "{}")]


@pytest.mark.parametrize("text", [ONE, TWO, "plain <tool answer> with < and <tool_ and\n\n"])
def test_every_two_way_split_gives_the_same_events(text: str) -> None:
    whole = run([text])
    for at in range(len(text) + 1):
        assert run([text[:at], text[at:]]) == whole, at


@given(st.data())
def test_any_split_gives_the_same_events(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from([ONE, TWO, TWO + "\nDone. <tool"]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(pieces) == run([text])


def test_character_by_character_streams_arguments_as_they_come() -> None:
    parser = ToolCallParser()
    seen: list[Event] = []
    for ch in ONE:
        seen += parser.feed(ch)
    fragments = [e for e in seen if isinstance(e, CallArguments)]
    assert len(fragments) > 10  # not one final blob
    assert isinstance(seen[0], CallStart) and seen[0].name == "get_weather"
    assert parser.finish() == []


def test_a_marker_prefix_is_held_back_and_released() -> None:
    parser = ToolCallParser()
    assert parser.feed("Hi <tool") == [Content("Hi")]
    assert parser.feed("box> there") == [Content(" <toolbox> there")]


def test_newlines_between_calls_are_not_content() -> None:
    assert content(run(list(TWO))) == "Let me check."


def test_text_only_keeps_its_trailing_whitespace() -> None:
    assert run(["Hello\n", "\n"]) == [Content("Hello\n\n")]


def test_unterminated_call_is_ended_at_finish() -> None:
    events = run(['<tool_call>\n{"name": "f", "arguments": {"a": "b'])
    assert calls(events) == [("f", '{"a": "b')]
    assert isinstance(events[-1], CallEnd)


def test_a_call_without_its_name_is_content() -> None:
    assert run(['<tool_call>\n{"na']) == [Content('<tool_call>\n{"na')]


def test_a_body_that_is_not_json_is_content() -> None:
    text = "<tool_call>not json</tool_call> after"
    assert run([text]) == [Content(text)]


def test_keys_in_another_order_and_string_arguments() -> None:
    events = run(['<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'])
    assert calls(events) == [("f", '{"a": 1}')]
    events = run(['<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'])
    assert calls(events) == [("f", '{"a": 1}')]


def test_name_only_call_gets_empty_arguments() -> None:
    assert calls(run(['<tool_call>{"name": "now"}</tool_call>'])) == [("now", "{}")]


def test_max_calls_drops_later_calls() -> None:
    events = run([TWO], max_calls=1)
    assert calls(events) == [("a", '{"x": 1}')]
    assert content(events) == "Let me check."


def test_many_tokens_per_chunk_ending_one_call_and_starting_the_next() -> None:
    at = TWO.index("</tool_call>") + 3
    events = run([TWO[:at], TWO[at:]])
    assert calls(events) == [("a", '{"x": 1}'), ("b", "{}")]


# ---- calls outside <tool_call> tags (llama.cpp's Hermes openings) --------------------------

NAMES = ("get_weather", "get_time")
#: Qwen2.5-Coder-1.5B's greedy answer to "What is the weather like in Paris right now? Use
#: the tool." with tool_choice "auto" (measured on rillet serve).
FENCED = (
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n'
    '    "unit": "celsius"\n  }\n}\n```'
)
FENCED_AROUND = "I'll check.\n" + FENCED + '\n```\n{"name": "get_time"}\n```\nDone.'
BARE = '{"name": "get_weather", "parameters": {"city": "Oslo"}} then text'
NOT_CALLS = [
    '```json\n{"name": "Bob", "age": 3}\n```',  # not a tool's name
    '```json\n{"city": "Paris"}\n```',  # no name first
    "```python\nprint(1)\n```",
    'Text ```json\n{"name": "get_weathe',  # cut short: could have been one
    'Text first {"name": "get_weather", "arguments": {}}',  # bare, but not first
    "`a` and `` b ``` c",
]
UNTAGGED = [FENCED, FENCED_AROUND, BARE, *NOT_CALLS]


def test_a_fenced_call_naming_a_tool_is_a_call() -> None:
    events = run([FENCED], names=NAMES)
    assert content(events) == ""
    [(name, arguments)] = calls(events)
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}


def test_fenced_calls_among_text() -> None:
    events = run([FENCED_AROUND], names=NAMES)
    assert content(events) == "I'll check.\nDone."
    assert [name for name, _ in calls(events)] == ["get_weather", "get_time"]
    assert calls(events)[1] == ("get_time", "{}")


def test_a_bare_call_first_is_a_call_and_parameters_are_its_arguments() -> None:
    events = run([BARE], names=NAMES)
    assert calls(events) == [("get_weather", '{"city": "Oslo"}')]
    assert content(events) == " then text"


@pytest.mark.parametrize("text", NOT_CALLS)
def test_text_that_is_not_an_untagged_call_is_all_content(text: str) -> None:
    assert run([text], names=NAMES) == [Content(text)]


def test_without_names_a_fenced_call_is_content() -> None:
    assert run([FENCED]) == [Content(FENCED)]


@pytest.mark.parametrize("text", UNTAGGED)
def test_untagged_every_two_way_split_gives_the_same_events(text: str) -> None:
    whole = run([text], names=NAMES)
    for at in range(len(text) + 1):
        assert run([text[:at], text[at:]], names=NAMES) == whole, at


@given(st.data())
def test_untagged_any_split_gives_the_same_events(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from([*UNTAGGED, TWO + FENCED]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(pieces, names=NAMES) == run([text], names=NAMES)


def test_a_fence_is_held_back_only_while_it_could_open_a_call() -> None:
    parser = ToolCallParser(None, NAMES)
    assert parser.feed("See:\n``") == [Content("See:")]
    assert parser.feed('`json\n{"name": "get_') == []
    assert parser.feed("wea") == []
    assert parser.feed('ther", "arguments": {"c') == [
        CallStart(0, "get_weather"),
        CallArguments(0, '{"c'),
    ]
    other = ToolCallParser(None, NAMES)
    assert other.feed("```json\n{") == []
    assert other.feed('"x": 1') == [Content('```json\n{"x": 1')]


def test_a_fenced_call_streams_its_arguments_character_by_character() -> None:
    parser = ToolCallParser(None, NAMES)
    seen: list[Event] = []
    for ch in FENCED:
        seen += parser.feed(ch)
    assert isinstance(seen[0], CallStart)
    assert len([e for e in seen if isinstance(e, CallArguments)]) > 10
    assert isinstance(seen[-1], CallEnd)  # ended by the closing fence, before finish
    assert parser.finish() == []
