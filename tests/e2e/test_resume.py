"""Resumable streams on a real ``rillet serve`` with the bundled model: a stream dropped after
5 events and resumed gives exactly the non-stream greedy answer (TGI and OpenAI routes, and
rillet.client over a real TCP drop); a stream nobody comes back for is aborted in the engine
and its blocks freed; the key that started a stream is the one that resumes it.
(The finer cases, held on a fake engine: ``server/http/test_resume_routes.py``.)"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from rillet.client import Client
from rillet.client.sse import ServerSentEvent, iter_events
from server_process import ServerHandle, frozen_engine, metric, start_server, wait_for
from tcp_proxy import DroppingProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEY = "resume-key"
AUTH = {"authorization": f"Bearer {KEY}"}
RESUMABLE = {"x-rillet-resumable": "1", **AUTH}
PROMPT = "Once upon a time, in a small village by the sea, there lived"
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
GREEDY = {"max_new_tokens": 40, "do_sample": False}


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerHandle]:
    """A server with an API key and a 2 s resume window (the expiry test waits it out)."""
    handle = start_server(["--api-key", KEY, "--resume-window", "2"])
    yield handle
    handle.stop()


@contextlib.contextmanager
def reading(
    server: ServerHandle, path: str, body: dict[str, Any], count: int
) -> Iterator[tuple[str, list[ServerSentEvent]]]:
    """A resumable stream with ``count`` events read: its id and the events. The connection
    drops when the block exits."""
    events: list[ServerSentEvent] = []
    with httpx.stream(
        "POST", server.url + path, json=body, headers=RESUMABLE, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        for event in iter_events(response.iter_bytes()):
            events.append(event)
            if len(events) == count:
                break
        assert len(events) == count, "the stream ended before the drop"
        yield response.headers["x-rillet-stream-id"], events


def drop_after(
    server: ServerHandle, path: str, body: dict[str, Any], count: int
) -> tuple[str, list[ServerSentEvent]]:
    """Start a resumable stream, read ``count`` events, drop the connection."""
    with reading(server, path, body, count) as (sid, events):
        return sid, events


def resume(server: ServerHandle, sid: str, last_id: str, key: str = KEY) -> httpx.Response:
    headers = {"last-event-id": last_id, "authorization": f"Bearer {key}"}
    return httpx.get(f"{server.url}/streams/{sid}", headers=headers, timeout=60)


def test_tgi_stream_dropped_after_5_events_resumes_to_the_greedy_answer(
    keyed_server: ServerHandle,
) -> None:
    whole = httpx.post(
        keyed_server.url + "/generate",
        json={"inputs": PROMPT, "parameters": GREEDY},
        headers=AUTH,
        timeout=60,
    ).json()["generated_text"]
    body = {"inputs": PROMPT, "parameters": GREEDY}
    sid, first = drop_after(keyed_server, "/generate_stream", body, 5)
    response = resume(keyed_server, sid, "5")
    assert response.status_code == 200, (response.text, first)
    events = first + list(iter_events([response.content]))
    assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
    payloads = [json.loads(e.data) for e in events]
    assert "".join(p["token"]["text"] for p in payloads) == whole
    assert payloads[-1]["generated_text"] == whole
    assert len(payloads) == GREEDY["max_new_tokens"]


def test_openai_stream_dropped_after_5_events_resumes_with_its_done(
    keyed_server: ServerHandle,
) -> None:
    request = {"messages": CHAT, "max_tokens": 40, "temperature": 0}
    whole = httpx.post(
        keyed_server.url + "/v1/chat/completions", json=request, headers=AUTH, timeout=60
    ).json()["choices"][0]["message"]["content"]
    sid, first = drop_after(keyed_server, "/v1/chat/completions", {**request, "stream": True}, 5)
    rest = list(iter_events([resume(keyed_server, sid, "5").content]))
    events = first + rest
    assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
    assert events[-1].data == "[DONE]" and [e.data for e in events].count("[DONE]") == 1
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole


def test_rillet_client_resumes_by_itself_over_a_real_drop(keyed_server: ServerHandle) -> None:
    with Client(keyed_server.url, api_key=KEY) as direct:
        whole = direct.generate(PROMPT, **GREEDY).generated_text  # type: ignore[arg-type]
    port = urlsplit(keyed_server.url).port
    assert port is not None
    with DroppingProxy(port, events=5) as proxy, Client(proxy.url, api_key=KEY) as client:
        items = list(client.generate_stream(PROMPT, **GREEDY))  # type: ignore[arg-type]
    assert proxy.dropped.is_set() and proxy.connections == 2
    assert "".join(i.token.text for i in items) == whole
    assert items[-1].generated_text == whole


def test_only_the_key_that_started_a_stream_resumes_it(keyed_server: ServerHandle) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}
    sid, first = drop_after(keyed_server, "/generate_stream", body, 1)
    denied = resume(keyed_server, sid, "1", key="another-key")
    assert denied.status_code == 401 and denied.json()["error_type"] == "authentication"
    unknown = resume(keyed_server, "no-such-stream", "1")
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found"
    assert resume(keyed_server, sid, first[-1].id).status_code == 200


def test_a_stream_nobody_resumes_is_aborted_and_its_blocks_freed(
    keyed_server: ServerHandle,
) -> None:
    cancelled = 'rillet_requests_total{outcome="cancelled",route="generate_stream"}'
    before = metric(keyed_server, cancelled)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "do_sample": False}}
    with contextlib.ExitStack() as connection:
        sid, _ = connection.enter_context(reading(keyed_server, "/generate_stream", body, 5))
        # Held in the engine, the generation cannot end by itself while the window runs.
        with frozen_engine(keyed_server):
            connection.close()  # the connection drops
            assert wait_for(lambda: metric(keyed_server, "rillet_resumable_streams") == 0, 60)
    assert wait_for(
        lambda: (
            metric(keyed_server, "rillet_requests_running") == 0
            and metric(keyed_server, "rillet_kv_cache_usage_ratio") == 0
            and metric(keyed_server, "rillet_requests_in_flight") == 0
        ),
        60,
    )
    assert metric(keyed_server, cancelled) == before + 1
    assert resume(keyed_server, sid, "5").status_code == 404
