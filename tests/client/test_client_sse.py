"""The client's SSE parser against the WHATWG rules, fed in every possible chunking."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from json_strategies import json_objects
from rillet.client.sse import ServerSentEvent, SSEDecoder, aiter_events, iter_events
from rillet.server.http.sse import sse_event

# What a TGI server puts on the wire, with a keep-alive comment, a 3-byte UTF-8 character
# and a 4-byte emoji that chunking will split.
TGI_STREAM = (
    b": keep-alive\n\n"
    b'data: {"token":{"text":" \xe2\x82\xac"}}\n\n'
    b'data:{"token":{"text":"\xf0\x9f\xa4\x97"}}\n\n'
)
TGI_EVENTS = [
    ServerSentEvent(data='{"token":{"text":" €"}}'),
    ServerSentEvent(data='{"token":{"text":"🤗"}}'),
]


def _parse(*chunks: bytes | str) -> list[ServerSentEvent]:
    return list(iter_events(chunks))


def test_whole_stream_in_one_chunk() -> None:
    assert _parse(TGI_STREAM) == TGI_EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    chunks = [TGI_STREAM[i : i + size] for i in range(0, len(TGI_STREAM), size)]
    assert _parse(*chunks) == TGI_EVENTS


def test_every_two_way_split_gives_the_same_events() -> None:
    stream = TGI_STREAM.replace(b"\n", b"\r\n")
    for cut in range(len(stream) + 1):
        assert _parse(stream[:cut], stream[cut:]) == TGI_EVENTS, cut


def test_only_one_space_after_the_colon_is_removed() -> None:
    events = _parse("data:a\n\ndata: a\n\ndata:  a\n\n")
    assert [e.data for e in events] == ["a", "a", " a"]


def test_payload_starting_with_letters_of_data_is_kept() -> None:
    # The text-generation client's lstrip("data:") turns this into "ta:ad".
    assert _parse("data:data:ad\n\n")[0].data == "data:ad"


def test_comments_and_empty_events_dispatch_nothing() -> None:
    assert _parse(":\n\n: ping\n\n\n\nevent: x\n\n") == []


def test_empty_data_line_is_an_event_with_empty_data() -> None:
    assert _parse("data:\n\n") == [ServerSentEvent(data="")]
    assert _parse("data\n\n") == [ServerSentEvent(data="")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert _parse("data: a\ndata:\ndata: b\n\n")[0].data == "a\n\nb"


@pytest.mark.parametrize("newline", ["\n", "\r", "\r\n"])
def test_all_three_line_endings(newline: str) -> None:
    text = f"data: one{newline}data: two{newline}{newline}data: three{newline}{newline}"
    assert [e.data for e in _parse(text)] == ["one\ntwo", "three"]


def test_crlf_split_across_chunks_is_one_line_ending() -> None:
    # If the lone CR ended a line and the LF then made a blank line, "a" would be
    # dispatched early and "b" would become its own event.
    assert _parse("data: a\r", "\ndata: b\r\n\r\n") == [ServerSentEvent(data="a\nb")]


def test_unicode_line_separators_are_not_line_endings() -> None:
    text = "data: a\u2028b\x0bc\x1cd\x85e\n\n"
    assert _parse(text)[0].data == "a\u2028b\x0bc\x1cd\x85e"


def test_bom_is_dropped_only_at_the_start() -> None:
    assert _parse(b"\xef\xbb", b"\xbfdata: x\n\n") == [ServerSentEvent(data="x")]
    assert _parse("data: \ufeffx\n\n")[0].data == "\ufeffx"


def test_event_id_and_retry_fields() -> None:
    events = _parse(
        "event: delta\nid: 7\nretry: 1500\ndata: a\n\nid: bad\x00id\nretry: soon\ndata: b\n\n"
    )
    assert events == [
        ServerSentEvent(data="a", event="delta", id="7", retry=1500),
        ServerSentEvent(data="b", event="message", id="7", retry=1500),
    ]


def test_unknown_fields_are_ignored() -> None:
    assert _parse("foo: bar\ndata: x\n\n") == [ServerSentEvent(data="x")]


def test_event_cut_off_by_end_of_stream_is_discarded() -> None:
    assert _parse("data: a\n\ndata: b\n") == [ServerSentEvent(data="a")]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    assert _parse(b"data: \xff\n\n")[0].data == "\ufffd"


def test_decoder_returns_events_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent(data="a")]


def test_async_iteration_uses_the_same_decoder() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(len(TGI_STREAM)):
            yield TGI_STREAM[i : i + 1]

    async def collect() -> list[ServerSentEvent]:
        return [event async for event in aiter_events(chunks())]

    assert asyncio.run(collect()) == TGI_EVENTS


@given(
    payloads=st.lists(json_objects, max_size=6),
    keep_alive_after=st.sets(st.integers(0, 6)),
    crlf=st.booleans(),
    data=st.data(),
)
def test_the_servers_events_come_back_whatever_the_chunking(
    payloads: list[dict[str, Any]], keep_alive_after: set[int], crlf: bool, data: st.DataObject
) -> None:
    """The server's framing (``sse_event``) read back by the client's parser, with
    keep-alive comments between events and the bytes cut anywhere, UTF-8 included."""
    wire = b": keep-alive\n\n" if 0 in keep_alive_after else b""
    for n, payload in enumerate(payloads, 1):
        wire += sse_event(payload) + (b": keep-alive\n\n" if n in keep_alive_after else b"")
    if crlf:
        wire = wire.replace(b"\n", b"\r\n")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(wire)), max_size=12)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert [json.loads(event.data) for event in iter_events(chunks)] == payloads
