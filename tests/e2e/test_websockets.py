"""The WebSocket door on a real ``rillet serve`` with the bundled model: the Ray tutorial's
chat client verbatim, and ``/ws`` against the OpenAI route (greedy text equal), a cancel and
a closed socket freeing the engine. (Frames, overload and the key on a held fake engine:
``server/test_ws.py``.)"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from polling import poll_until_sync
from server_process import ServerHandle, frozen_engine, metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def ws_url(server: ServerHandle, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def tutorial_turn(websocket: ClientConnection, prompt: str) -> str:
    """The tutorial client's loop (print replaced by collecting what it would print)."""
    websocket.send(prompt)
    printed = []
    while True:
        message = websocket.recv()
        if message == "<<Response Finished>>":
            break
        printed.append(message)
    return "".join(printed)


def chat_answer(server: ServerHandle, messages: list[dict[str, str]], **fields: Any) -> str:
    body = {"messages": messages, "temperature": 0, **fields}
    answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    return str(answer["choices"][0]["message"]["content"])


def test_tutorial_chat_client_keeps_the_conversation(server: ServerHandle) -> None:
    first_turn, second_turn = "What is the capital of France?", "What was my previous question?"
    with connect(ws_url(server, "/")) as websocket, connect(ws_url(server, "/")) as other:
        reply = tutorial_turn(websocket, first_turn)
        follow_up = tutorial_turn(websocket, second_turn)
        fresh = tutorial_turn(other, second_turn)
    history = [
        {"role": "user", "content": first_turn},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second_turn},
    ]
    assert reply == chat_answer(server, history[:1], max_tokens=512) and reply
    # The second turn saw the first: it is the chat route's answer to the whole history...
    assert follow_up == chat_answer(server, history, max_tokens=512)
    # ... while the other socket has its own conversation: the same question, asked afresh,
    # gets the chat route's answer to it alone, and that is another answer. (Whether the
    # model quotes the first question back is up to its numerics, not the server's.)
    assert fresh == chat_answer(server, history[2:], max_tokens=512)
    assert fresh != follow_up and first_turn not in fresh


def frames_until_final(sock: ClientConnection, ids: set[str]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    pending = set(ids)
    while pending:
        frame = json.loads(sock.recv())
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            pending.discard(frame["id"])
    return frames


def test_interleaved_generations_equal_the_openai_route(server: ServerHandle) -> None:
    asks = {
        "colors": {"messages": [{"role": "user", "content": "Name three colors."}]},
        "count": {"prompt": "Count: one, two,"},
    }
    fields = {"max_tokens": 24, "temperature": 0}
    with connect(ws_url(server, "/ws")) as sock:
        for key, ask in asks.items():
            sock.send(json.dumps({"type": "generate", "id": key, **ask, **fields}))
        frames = frames_until_final(sock, set(asks))
    texts = {
        key: "".join(f["text"] for f in frames if f["id"] == key and f["type"] == "token")
        for key in asks
    }
    assert texts["colors"] == chat_answer(server, asks["colors"]["messages"], **fields)
    completion = httpx.post(
        server.url + "/v1/completions", json={**asks["count"], **fields}, timeout=60
    ).json()
    assert texts["count"] == completion["choices"][0]["text"]
    done = {f["id"]: f for f in frames if f["type"] == "done"}
    assert done["count"]["usage"]["completion_tokens"] == completion["usage"]["completion_tokens"]


def test_a_cancel_ends_one_generation_and_frees_it(server: ServerHandle) -> None:
    endless = {"prompt": "Count: one, two,", "max_tokens": 4000, "ignore_eos": True}
    with connect(ws_url(server, "/ws")) as sock, contextlib.ExitStack() as thaw:
        sock.send(json.dumps({"type": "generate", "id": "endless", **endless}))
        first = json.loads(sock.recv())
        assert first["type"] == "token"
        thaw.enter_context(frozen_engine(server))  # it is running and stays so
        sock.send(json.dumps({"type": "cancel", "id": "endless"}))
        sock.send(json.dumps({"type": "generate", "id": "next", "prompt": "Hi", "max_tokens": 3}))
        thaw.close()
        frames = frames_until_final(sock, {"endless", "next"})
    finals = {f["id"]: f for f in frames if f["type"] in ("done", "error")}
    assert finals["endless"]["finish_reason"] == "cancelled"
    assert finals["next"]["finish_reason"] == "length"
    poll_until_sync(lambda: metric(server, "rillet_requests_running") == 0)
    assert metric(server, "rillet_requests_in_flight") == 0


def test_closing_the_socket_aborts_its_generations(server: ServerHandle) -> None:
    cancelled = 'rillet_requests_total{outcome="cancelled",route="ws"}'
    before = metric(server, cancelled)
    endless = {"prompt": "Count: one, two,", "max_tokens": 4000, "ignore_eos": True}
    with contextlib.ExitStack() as thaw:
        with connect(ws_url(server, "/ws")) as sock:
            for key in ("a", "b"):
                sock.send(json.dumps({"type": "generate", "id": key, **endless}))
            seen = set()
            while seen != {"a", "b"}:
                seen.add(json.loads(sock.recv())["id"])
            thaw.enter_context(frozen_engine(server))
            assert metric(server, "rillet_requests_running") == 2
        poll_until_sync(lambda: metric(server, "rillet_requests_in_flight") == 0)
    poll_until_sync(lambda: metric(server, "rillet_requests_running") == 0)
    assert metric(server, cancelled) == before + 2
