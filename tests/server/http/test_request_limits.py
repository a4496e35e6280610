"""What a hostile client cannot get past, on a fake engine: JSON nested without end, headers
without end, too many or too long stop sequences, too many messages. Each is a clear 4xx in
the route's own format (a refused handshake or an error frame on WebSockets); none reaches
the engine or leaves a slot taken."""

from __future__ import annotations

import json

import pytest
import websockets
from websockets.asyncio.client import connect

from app_server import door
from rillet.server.serve_cmd import add_parser

pytestmark = pytest.mark.timeout(30)

TGI_ROUTES = ("/generate", "/generate_stream", "/")
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def test_json_nested_without_end_is_a_4xx_not_a_500() -> None:
    # 5,000 levels: Python's json would raise RecursionError near 1,000.
    deep = "[" * 5000 + "]" * 5000
    inside = '{"inputs": "Hi", "parameters": {"stop": ' + "[" * 100 + "]" * 100 + "}}"
    async with door() as d:
        for path in (*TGI_ROUTES, *OPENAI_ROUTES, "/v2/models/fake-model/generate"):
            for body in (deep, inside):
                response = await d.http.post(path, content=body)
                assert response.status_code in (400, 422), (path, response.text)
                assert "nested deeper than 64 levels" in response.text
                assert "error" in response.json()
        # Brackets inside strings are text, however many.
        fine = {"inputs": "[" * 200, "parameters": {"max_new_tokens": 1}}
        assert (await d.http.post("/generate", json=fine)).status_code == 200
        assert d.service.in_flight == 0 and len(d.engine.requests) == 1


async def test_headers_past_the_limit_are_431_in_the_routes_format() -> None:
    padding = {"x-padding": "a" * 2000}
    async with door(max_header_bytes=1024) as d:
        tgi = await d.http.post("/generate", json={"inputs": "Hi"}, headers=padding)
        assert tgi.status_code == 431
        assert tgi.json() == {
            "error": "Input validation error: the request headers pass 1024 bytes",
            "error_type": "validation",
        }
        openai = await d.http.post("/v1/chat/completions", json=CHAT, headers=padding)
        assert openai.status_code == 431 and openai.json()["error"]["type"] == "validation"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(d.url.replace("http", "ws") + "/ws", additional_headers=padding):
                pass
        assert refused.value.response.status_code == 431
        # Under the limit, everything as usual.
        assert (await d.http.get("/health", headers={"x-padding": "a" * 500})).status_code == 200
        assert not d.engine.requests


async def test_stop_sequences_and_messages_are_bounded_on_every_door() -> None:
    async with door(max_stop_sequences=2, max_stop_length=8, max_messages=3) as d:
        three = {"inputs": "Hi", "parameters": {"stop": ["a", "b", "c"]}}
        for path in TGI_ROUTES:
            response = await d.http.post(path, json=three)
            assert response.status_code == 422
            assert response.json()["error"] == (
                "Input validation error: `stop` supports up to 2 stop sequences. Given: 3"
            )
        long_stop = await d.http.post("/v1/completions", json={"prompt": "Hi", "stop": "x" * 9})
        assert long_stop.status_code == 400
        assert long_stop.json()["error"]["message"] == (
            "a stop sequence may have at most 8 characters. Given: 9"
        )
        four = {"messages": [{"role": "user", "content": "Hi"}] * 4}
        chat = await d.http.post("/v1/chat/completions", json=four)
        assert chat.status_code == 400
        assert chat.json()["error"]["message"] == "`messages` may hold at most 3 messages. Given: 4"
        async with connect(d.url.replace("http", "ws") + "/ws") as sock:
            await sock.send(json.dumps({"type": "generate", "id": 1} | four))
            too_long = {"type": "generate", "id": 2, "prompt": "Hi", "stop": "x" * 9}
            await sock.send(json.dumps(too_long))
            frames = [json.loads(await sock.recv()) for _ in range(2)]
        assert [(f["type"], f["id"], f["error"]) for f in frames] == [
            ("error", 1, "`messages` may hold at most 3 messages. Given: 4"),
            ("error", 2, "a stop sequence may have at most 8 characters. Given: 9"),
        ]
        assert d.service.in_flight == 0 and not d.engine.requests


def test_rillet_serve_help_lists_the_limits_and_their_defaults() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(serve.choices["serve"].format_help().split())
    for option, default in (
        ("--max-body-bytes", "2000000"),
        ("--max-header-bytes", "16384"),
        ("--max-stop-sequences", "4"),
        ("--max-stop-length", "512"),
        ("--max-messages", "1024"),
        ("--max-concurrent-requests", "128"),
    ):
        assert option in text and f"default: {default}" in text.split(option, 1)[1], option
    assert "nest at most 64 levels" in text
