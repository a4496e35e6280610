"""The client's error table, request bodies and stream reading, against recorded answers.

These run the real Client/AsyncClient over httpx's in-process MockTransport serving byte
streams recorded in TGI's and OpenAI's formats: for wire cases a healthy server cannot be
made to produce on demand (an error event after some tokens, a body cut short, a 429 with
``retry-after``). Everything else is tested against a real server in test_client.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

import rillet.errors
from rillet.client import (
    APIConnectionError,
    AsyncClient,
    BadRequestError,
    Client,
    ClientError,
    GenerationError,
    IncompleteGenerationError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnknownError,
    ValidationError,
    parse_error,
)
from rillet.client._core import parse_retry_after

URL = "http://rillet.test"
SSE = {"content-type": "text/event-stream"}


def _token_event(index: int, text: str, *, last: bool = False) -> bytes:
    event: dict[str, Any] = {
        "index": index,
        "token": {"id": index, "text": text, "logprob": -0.5, "special": False},
        "generated_text": None,
        "details": None,
    }
    if last:
        event["generated_text"] = "".join(["a", "b"][:index])
        event["details"] = {"finish_reason": "length", "generated_tokens": index, "seed": None}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


TWO_TOKENS = _token_event(1, "a") + _token_event(2, "b", last=True)
ERROR_AFTER_ONE = (
    _token_event(1, "a") + b'data: {"error":"Request failed: boom","error_type":"generation"}\n\n'
)


def _bytewise(body: bytes) -> Iterator[bytes]:
    return (body[i : i + 1] for i in range(len(body)))


def _client(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> Client:
    return Client(URL, http_client=httpx.Client(transport=httpx.MockTransport(handler)), **kw)


def _stream_answer(body: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, headers=SSE, content=_bytewise(body))


# ---- error table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "payload", "cls"),
    [
        (422, {"error": "Input validation error: x", "error_type": "validation"}, ValidationError),
        (429, {"error": "Model is overloaded", "error_type": "overloaded"}, OverloadedError),
        (424, {"error": "failed", "error_type": "generation"}, GenerationError),
        (500, {"error": "cut", "error_type": "incomplete_generation"}, IncompleteGenerationError),
        (422, {"error": "bad template", "error_type": "template_error"}, ValidationError),
        (400, {"error": {"message": "bad", "type": "BadRequest", "code": 400}}, BadRequestError),
        (422, {"error": {"message": "bad", "type": "validation"}}, ValidationError),
        (404, {"detail": "Not Found"}, NotFoundError),
        (502, "Bad Gateway", UnknownError),
        (None, {"error": {"message": "bad", "http_status_code": 422}}, ValidationError),
        (None, {"error": "boom", "error_type": "overloaded"}, OverloadedError),
    ],
)
def test_error_type_wins_then_status(
    status: int | None, payload: Any, cls: type[ClientError]
) -> None:
    error = parse_error(status, payload)
    assert type(error) is cls
    assert error.status_code == status
    assert error.message


def test_client_errors_are_the_server_side_classes_too() -> None:
    error = parse_error(429, {"error": "Model is overloaded", "error_type": "overloaded"})
    assert isinstance(error, rillet.errors.OverloadedError)
    assert error.error_type == "overloaded"
    assert parse_error(422, {"error": "x", "error_type": "template_error"}).error_type == (
        "template_error"
    )


@pytest.mark.parametrize("server_cls", rillet.errors.ERROR_TABLE, ids=lambda c: c.__name__)
def test_the_client_mirrors_the_servers_table(server_cls: type[rillet.errors.RilletError]) -> None:
    """Every error the server can send comes back typed: by its ``error_type`` as the
    server's class for that wire string, and by its status alone (a proxy may drop bodies)."""
    canonical = next(c for c in rillet.errors.ERROR_TABLE if c.error_type == server_cls.error_type)
    body = {"error": "x", "error_type": server_cls.error_type}
    by_type = parse_error(server_cls.http_status, body)
    assert isinstance(by_type, canonical) and by_type.error_type == server_cls.error_type
    assert not isinstance(parse_error(server_cls.http_status, ""), UnknownError)


def test_retry_after_as_seconds_or_http_date() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# ---- requests ---------------------------------------------------------------------------


def test_generate_body_sends_only_given_parameters() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert request.url.path == "/generate"
        assert request.headers["authorization"] == "Bearer k"
        return httpx.Response(200, json={"generated_text": "ab"})

    client = _client(handler, api_key="k")
    assert client.generate("hi", stop_sequences=["\n"], top_p=1.0).generated_text == "ab"
    # No client-side range check: top_p=1.0 goes to the server, which decides.
    assert seen == [{"inputs": "hi", "parameters": {"stop": ["\n"], "top_p": 1.0, "details": True}}]


def test_chat_body_and_extra_body() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant"}}]})

    _client(handler).chat([{"role": "user", "content": "hi"}], max_tokens=3, extra_body={"k": 1})
    assert seen == [
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": False, "k": 1}
    ]


# ---- streams ----------------------------------------------------------------------------


def test_stream_fed_byte_by_byte() -> None:
    items = list(_client(_stream_answer(b": ping\n\n" + TWO_TOKENS)).generate_stream("hi"))
    assert [i.token.text for i in items] == ["a", "b"]
    assert items[-1].generated_text == "ab"


def test_in_band_error_raises_after_the_tokens_before_it() -> None:
    stream = _client(_stream_answer(ERROR_AFTER_ONE)).generate_stream("hi")
    assert next(stream).token.text == "a"
    with pytest.raises(GenerationError) as info:
        next(stream)
    assert info.value.status_code is None  # in-band: the HTTP status was 200
    assert "boom" in info.value.message


def test_openai_error_event_then_done_raises() -> None:
    body = b'data: {"error":{"message":"engine died","type":"generation"}}\n\ndata: [DONE]\n\n'
    with pytest.raises(GenerationError, match="engine died"):
        list(_client(_stream_answer(body)).chat([{"role": "user", "content": "x"}], stream=True))


def test_chat_stream_stops_at_done() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    chunks = list(_client(_stream_answer(body)).chat([], stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["hi"]


@pytest.mark.parametrize(
    "body", [_token_event(1, "a"), b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n']
)
def test_stream_cut_short_raises_incomplete(body: bytes) -> None:
    client = _client(_stream_answer(body))
    call = client.chat([], stream=True) if b"choices" in body else client.generate_stream("hi")
    with pytest.raises(IncompleteGenerationError):
        list(call)


def test_garbage_event_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        list(_client(_stream_answer(b"data: {not json\n\n")).generate_stream("hi"))
    with pytest.raises(ProtocolError):
        list(_client(_stream_answer(b'data: {"token": 3}\n\n')).generate_stream("hi"))


def test_http_error_on_stream_route_is_typed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"error": "bad", "error_type": "validation"})

    with pytest.raises(ValidationError):
        list(_client(handler).generate_stream("hi"))


# ---- retry ------------------------------------------------------------------------------


def _overloaded_then(answer: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            body = {"error": "Model is overloaded", "error_type": "overloaded"}
            return httpx.Response(429, json=body, headers={"retry-after": "0"})
        return answer

    return handler


def test_no_retry_by_default() -> None:
    client = _client(_overloaded_then(httpx.Response(200, json={"generated_text": "x"})))
    with pytest.raises(OverloadedError) as info:
        client.generate("hi")
    assert info.value.retry_after == 0.0
    assert info.value.status_code == 429


def test_retry_on_overloaded_honours_retry_after() -> None:
    ok = httpx.Response(200, json={"generated_text": "x"})
    assert _client(_overloaded_then(ok), max_retries=1).generate("hi").generated_text == "x"
    stream_ok = httpx.Response(200, headers=SSE, content=TWO_TOKENS)
    streamed = _client(_overloaded_then(stream_ok), max_retries=1).generate_stream("hi")
    assert [i.token.text for i in streamed] == ["a", "b"]


def test_unreachable_server_is_a_connection_error() -> None:
    with pytest.raises(APIConnectionError):
        Client("http://127.0.0.1:9", timeout=2).generate("hi")


# ---- async twin -------------------------------------------------------------------------


def test_async_twin_reads_the_same_streams() -> None:
    def answer(body: bytes) -> Callable[[httpx.Request], httpx.Response]:
        async def chunks() -> AsyncIterator[bytes]:
            for piece in _bytewise(body):
                yield piece

        return lambda request: httpx.Response(200, headers=SSE, content=chunks())

    def client(body: bytes) -> AsyncClient:
        transport = httpx.MockTransport(answer(body))
        return AsyncClient(URL, http_client=httpx.AsyncClient(transport=transport))

    async def run() -> None:
        texts = [i.token.text async for i in client(TWO_TOKENS).generate_stream("hi")]
        assert texts == ["a", "b"]
        seen: list[str] = []
        with pytest.raises(GenerationError):
            async for item in client(ERROR_AFTER_ONE).generate_stream("hi"):
                seen.append(item.token.text)
        assert seen == ["a"]

    asyncio.run(run())
