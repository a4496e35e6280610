"""The WebSocket door on a fake engine the test holds: ``/ws``'s frames (interleaving,
cancel, close, bad frames, overload, the key) and the tutorial chat's turns."""

from __future__ import annotations

import json
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from app_server import door, held_stream
from fake_engine import FakeEngine
from polling import poll_until
from rillet.server.config import ServerConfig
from rillet.server.dialects.ws import RESPONSE_FINISHED
from rillet.server.service import GenerationService
from rillet.server.ws import _handle

pytestmark = pytest.mark.timeout(30)


def ws_url(url: str, path: str = "/ws") -> str:
    return url.replace("http://", "ws://") + path


async def frames_until_final(sock: ClientConnection, ids: set[Any]) -> list[dict[str, Any]]:
    """Every frame until each of ``ids`` has had its done or error frame."""
    frames: list[dict[str, Any]] = []
    pending = set(ids)
    while pending:
        frame = json.loads(await sock.recv())
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            pending.discard(frame["id"])
    return frames


def generate(frame_id: Any, **fields: Any) -> str:
    body = {"type": "generate", "id": frame_id, "messages": [{"role": "user", "content": "Hi"}]}
    return json.dumps(body | fields)


async def test_two_generations_interleave_on_one_socket() -> None:
    async with door() as d, connect(ws_url(d.url)) as sock:
        d.engine.pause()
        await sock.send(generate("a", max_tokens=5, logprobs=True))
        await sock.send(json.dumps({"type": "generate", "id": 7, "prompt": "Hi", "max_tokens": 2}))
        await d.engine.wait_running(2)
        first_two = [json.loads(await sock.recv()) for _ in range(2)]
        assert {f["id"] for f in first_two} == {"a", 7}  # both streams started before either ended
        d.engine.resume()
        frames = first_two + await frames_until_final(sock, {"a", 7})
    by_id = {key: [f for f in frames if f["id"] == key] for key in ("a", 7)}
    assert "".join(f["text"] for f in by_id["a"] if f["type"] == "token") == "Hello"
    assert "".join(f["text"] for f in by_id[7] if f["type"] == "token") == "He"
    assert by_id["a"][0]["logprobs"] == [-0.5] and "logprobs" not in by_id[7][0]
    assert by_id["a"][0]["token_ids"] == d.engine.tokenizer.encode("H", add_special_tokens=False)
    assert by_id["a"][-1] == {
        "type": "done",
        "id": "a",
        "finish_reason": "length",
        "usage": {
            "prompt_tokens": len(d.engine.requests[0].prompt_token_ids),
            "completion_tokens": 5,
        },
    }
    assert [f["type"] for f in by_id[7]] == ["token", "token", "done"]


async def test_cancel_ends_one_generation_and_the_other_finishes() -> None:
    async with door() as d, connect(ws_url(d.url)) as sock:
        d.engine.pause()
        await sock.send(generate("stop-me", max_tokens=5))
        await sock.send(generate("keep", max_tokens=3))
        await d.engine.wait_running(2)
        await sock.send(json.dumps({"type": "cancel", "id": "stop-me"}))
        await poll_until(lambda: len(d.engine.aborted) == 1)
        d.engine.resume()
        frames = await frames_until_final(sock, {"stop-me", "keep"})
        await sock.send(json.dumps({"type": "cancel", "id": "stop-me"}))  # ended: a no-op
        await sock.send(generate("after", max_tokens=1))
        frames_after = await frames_until_final(sock, {"after"})
    finals = {f["id"]: f for f in frames if f["type"] in ("done", "error")}
    assert finals["stop-me"]["finish_reason"] == "cancelled"
    assert finals["stop-me"]["usage"]["completion_tokens"] == 1
    assert finals["keep"]["finish_reason"] == "length"
    assert sum(1 for f in frames if f["type"] == "done" and f["id"] == "stop-me") == 1
    assert [f["type"] for f in frames_after] == ["token", "done"]  # nothing more for stop-me
    assert d.service.in_flight == 0 and not d.engine.running


async def test_a_cancel_handled_before_its_generation_began_still_returns_the_permit() -> None:
    """Two frames read back to back (both already buffered: no await yields between them)
    cancel a generation whose task has not run a step yet. Its body's ``finally`` never
    runs then; the permit must come back all the same."""
    service = GenerationService(FakeEngine(), ServerConfig())  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        sent.append(frame)

    running: dict[Any, Any] = {}
    await _handle(service, generate("early", max_tokens=5), running, send)
    assert service.in_flight == 1
    await _handle(service, json.dumps({"type": "cancel", "id": "early"}), running, send)
    assert [(f["type"], f["id"], f.get("finish_reason")) for f in sent] == [
        ("done", "early", "cancelled")
    ]
    assert service.in_flight == 0 and not running


async def test_closing_the_socket_aborts_everything_on_it() -> None:
    async with door() as d:
        d.engine.pause()
        async with connect(ws_url(d.url)) as sock:
            for key in ("a", "b", "c"):
                await sock.send(generate(key, max_tokens=5))
            await d.engine.wait_running(3)
        await poll_until(lambda: len(d.engine.aborted) == 3 and d.service.in_flight == 0)
        assert not d.engine.running and not d.engine.finished


async def test_bad_frames_get_error_frames_and_the_socket_stays_open() -> None:
    async with door() as d, connect(ws_url(d.url)) as sock:
        bad = [
            ("{", None),
            ("[1, 2]", None),
            (json.dumps({"type": "generate"}), None),
            (json.dumps({"type": "dance", "id": "x"}), "x"),
            (json.dumps({"type": "generate", "id": "y"}), "y"),  # neither messages nor prompt
            (json.dumps({"type": "generate", "id": "z", "prompt": "Hi", "n": 2}), "z"),
            (json.dumps({"type": "generate", "id": "t", "prompt": "Hi", "max_tokens": "x"}), "t"),
        ]
        for text, frame_id in bad:
            await sock.send(text)
            frame = json.loads(await sock.recv())
            assert frame["type"] == "error" and frame["id"] == frame_id, (text, frame)
            assert frame["error_type"] == "validation" and frame["error"]
        await sock.send(b"\x00binary")
        assert json.loads(await sock.recv())["id"] is None
        await sock.send(generate("ok", max_tokens=2))
        assert [f["type"] for f in await frames_until_final(sock, {"ok"})] == [
            "token",
            "token",
            "done",
        ]
    assert d.service.in_flight == 0 and not d.engine.aborted


async def test_overload_is_an_error_frame_at_once() -> None:
    async with door(max_concurrent_requests=1) as d, held_stream(d):
        async with connect(ws_url(d.url)) as sock:
            await sock.send(generate("busy"))
            assert json.loads(await sock.recv()) == {
                "type": "error",
                "id": "busy",
                "error": "Model is overloaded",
                "error_type": "overloaded",
                "retry_after": 1,
            }
        assert d.service.in_flight == 1  # only the held stream


async def test_the_key_guards_the_handshake() -> None:
    async with door(api_key="k3y") as d:
        for url, headers in (
            (ws_url(d.url), {}),
            (ws_url(d.url) + "?api_key=wrong", {}),
            (ws_url(d.url), {"Authorization": "Bearer wrong"}),
            (ws_url(d.url, "/"), {}),
        ):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 401
            assert json.loads(refused.value.response.body)["error_type"] == "authentication"
        for url, headers in (
            (ws_url(d.url) + "?api_key=k3y", {}),
            (ws_url(d.url), {"Authorization": "Bearer k3y"}),
        ):
            async with connect(url, additional_headers=headers) as sock:
                await sock.send(generate("in", max_tokens=1))
                assert len(await frames_until_final(sock, {"in"})) == 2
        assert len(d.engine.requests) == 2


async def test_tutorial_chat_keeps_the_conversation_per_socket() -> None:
    async with door() as d:
        d.engine.reply = "Sure."
        async with connect(ws_url(d.url, "/")) as first, connect(ws_url(d.url, "/")) as second:
            replies = []
            for sock, text in ((first, "Hi"), (first, "Again"), (second, "Other")):
                await sock.send(text)
                pieces = []
                while (piece := await sock.recv()) != RESPONSE_FINISHED:
                    pieces.append(piece)
                replies.append(pieces)
        assert replies == [list("Sure.")] * 3
        prompts = [d.engine.tokenizer.decode(r.prompt_token_ids) for r in d.engine.requests]
        # The second turn on the first socket sees the first turn and its reply; the other
        # socket starts afresh.
        assert prompts[1] == "user\nHi\nassistant\nSure.\nuser\nAgain\nassistant\n"
        assert prompts[2] == "user\nOther\nassistant\n"
        assert d.service.in_flight == 0


async def test_tutorial_chat_says_when_it_is_refused_and_keeps_the_socket() -> None:
    async with door(max_concurrent_requests=1) as d:
        async with held_stream(d), connect(ws_url(d.url, "/")) as sock:
            await sock.send("Hi")
            assert await sock.recv() == "[overloaded] Model is overloaded"
            assert await sock.recv() == RESPONSE_FINISHED
            d.engine.resume()
            await poll_until(lambda: d.service.in_flight == 0)
            await sock.send("Hi")
            pieces = []
            while (piece := await sock.recv()) != RESPONSE_FINISHED:
                pieces.append(piece)
        assert "".join(pieces) == "Hello world"
        # The refused turn is not part of the conversation.
        last_prompt = d.engine.tokenizer.decode(d.engine.requests[-1].prompt_token_ids)
        assert last_prompt == "user\nHi\nassistant\n"
