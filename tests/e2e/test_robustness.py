"""What must hold whatever clients do: bad bodies get 4xx JSON on every route, a disconnect
aborts the request in the engine, and the Ray Serve tutorial's plain-text client streams.
And what must hold when the engine dies: open streams end with an error event, then the
server brings the engine back by itself.
(Tokens reaching ``curl -N`` one by one is checked on a held fake engine, in
``server/http/test_http_doors.py``.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests

from server_process import ServerHandle, child_pids, frozen_engine, metric, start_server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EOS_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TGI_ROUTES = ["/generate", "/generate_stream", "/", "/tokenize"]
OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions"]
MALFORMED: list[bytes] = [
    b"",
    b"{",
    b"\xff\xfe{}",
    b"null",
    b"[]",
    b'"inputs"',
    b"{}",
    b'{"inputs": 5}',
    b'{"inputs": "x", "parameters": {"max_new_tokens": "many"}}',
    b'{"inputs": "x", "parameters": []}',
    b'{"messages": "hi", "prompt": ["a", "b"]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "prompt": []}',
]
#: Well-formed but out of range for every generation route (/tokenize ignores parameters).
INVALID_VALUES = (
    b'{"messages": [], "prompt": "x", "inputs": "x", "max_tokens": -1, "parameters": '
    b'{"max_new_tokens": -1}}'
)


@pytest.mark.parametrize("route", TGI_ROUTES + OPENAI_ROUTES)
def test_malformed_bodies_get_4xx_json_in_the_route_format(
    server: ServerHandle, route: str
) -> None:
    bodies = [*MALFORMED, b"x" * 2_000_001]
    if route != "/tokenize":
        bodies.append(INVALID_VALUES)
    for body in bodies:
        response = httpx.post(server.url + route, content=body, timeout=30)
        assert 400 <= response.status_code < 500, (route, body[:80], response.text)
        error = response.json()["error"]
        if route.startswith("/v1/"):
            assert isinstance(error["message"], str) and error["code"] == response.status_code
        else:
            assert isinstance(error, str) and response.json()["error_type"] == "validation"
        if len(body) > 2_000_000:
            assert response.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_fields_nulls_and_any_content_type_are_accepted(server: ServerHandle) -> None:
    tgi = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 2, "top_k": null, "x": 1}, "y": 2}'
    response = httpx.post(
        server.url + "/generate", content=tgi, headers={"content-type": "text/plain"}
    )
    assert response.status_code == 200, response.text
    chat = {
        "model": "http://x/y",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "logprobs": None,
        "stream_options": None,
        "z": {},
    }
    assert httpx.post(server.url + "/v1/chat/completions", json=chat).status_code == 200
    assert httpx.get(server.url + "/nope").json()["error_type"] == "not_found"


def _long_request(route: str) -> dict[str, Any]:
    if route == "/generate_stream":
        return {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}
    return {
        "prompt": "Count: one, two,",
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": route.endswith("stream"),
    }


@pytest.mark.parametrize("route", ["/generate_stream", "/v1/completions"])
def test_disconnect_mid_stream_aborts_the_engine_request(server: ServerHandle, route: str) -> None:
    route_label = route.removeprefix("/v1/").removeprefix("/")
    cancelled = f'rillet_requests_total{{outcome="cancelled",route="{route_label}"}}'
    before = metric(server, cancelled)
    body = _long_request(route) | {"stream": True}
    with contextlib.ExitStack() as thaw:
        with httpx.stream("POST", server.url + route, json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            # Frozen after its first token, the request is running and stays so.
            thaw.enter_context(frozen_engine(server))
            assert metric(server, "rillet_requests_running") == 1
        # The client has gone; the abort waits in the engine's inbox until it thaws.
        assert wait_for(lambda: metric(server, "rillet_requests_in_flight") == 0)
    assert wait_for(lambda: metric(server, "rillet_requests_running") == 0)
    assert metric(server, cancelled) == before + 1


def test_disconnect_while_waiting_for_a_non_stream_answer_aborts(server: ServerHandle) -> None:
    body = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert wait_for(lambda: metric(server, "rillet_requests_running") == 0)
    assert metric(server, "rillet_requests_in_flight") == 0


def test_ray_serve_tutorial_client_streams_plain_text(server: ServerHandle) -> None:
    # The tutorial's client, verbatim: the prompt in the query, unquoted (requests quotes it).
    prompt = "Tell me a story about dogs."
    response = requests.post(f"{server.url}/?prompt={prompt}", stream=True, timeout=60)
    response.raise_for_status()
    chunks = list(response.iter_content(chunk_size=None, decode_unicode=True))
    assert response.headers["content-type"].startswith("text/plain")
    # The prompt is the user's turn, through the chat template: the same greedy story as chat.
    chat = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 128,
        "temperature": 0,
    }
    answer = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    expected = answer["choices"][0]["message"]["content"]
    assert "".join(chunks) == expected and len(chunks) > 10


def test_plain_text_raw_true_sends_the_prompt_as_is(server: ServerHandle) -> None:
    url = f"{server.url}/?prompt={quote(EOS_PROMPT)}&raw=true"
    chunks = list(requests.post(url, stream=True, timeout=60).iter_content(None, True))
    expected = httpx.post(
        server.url + "/generate",
        json={"inputs": EOS_PROMPT, "parameters": {"max_new_tokens": 128}},
        timeout=60,
    ).json()["generated_text"]
    assert "".join(chunks) == expected and len(chunks) > 1


def assert_serves(handle: ServerHandle) -> None:
    """A short generation answers 200 with text."""
    answer = httpx.post(
        handle.url + "/generate",
        json={"inputs": "The sea is", "parameters": {"max_new_tokens": 3}},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["generated_text"]


def test_a_killed_engine_ends_open_streams_then_the_server_brings_it_back() -> None:
    handle = start_server()
    try:
        body = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}
        with httpx.stream("POST", handle.url + "/generate_stream", json=body, timeout=60) as r:
            events = r.iter_lines()
            next(line for line in events if line.startswith("data:"))
            # Frozen, the stream cannot end on its own before the kill lands.
            with frozen_engine(handle) as killed:
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            rest = [json.loads(line[5:]) for line in events if line.startswith("data:")]
        # Nothing more than one error event after the kill (some tokens may have been on
        # their way), in TGI's in-band shape.
        assert rest and all("token" in event for event in rest[:-1])
        assert rest[-1]["error_type"] == "generation"
        assert "engine process died" in rest[-1]["error"]
        assert wait_for(lambda: httpx.get(handle.url + "/health").status_code == 200, 120)
        assert_serves(handle)
        assert metric(handle, "rillet_engine_restarts") == 1
        assert set(child_pids(handle.proc.pid)).isdisjoint(killed)
    finally:
        handle.stop()


def test_a_failed_forward_ends_its_streams_in_their_formats_and_serving_goes_on() -> None:
    # The engine's fault hook: the first step that runs 2 requests raises in its forward.
    handle = start_server(env={"RILLET_FAIL_FORWARD_AT_BATCH_SIZE": "2"})
    try:
        tgi_body = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}
        chat_body = {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 50,
            "stream": True,
        }
        with contextlib.ExitStack() as streams:
            tgi = streams.enter_context(
                httpx.stream("POST", handle.url + "/generate_stream", json=tgi_body, timeout=60)
            )
            tgi_events = (line for line in tgi.iter_lines() if line.startswith("data:"))
            next(tgi_events)  # running alone: batches of 1
            with frozen_engine(handle):  # the chat joins it: the next step runs 2
                chat = streams.enter_context(
                    httpx.stream(
                        "POST", handle.url + "/v1/chat/completions", json=chat_body, timeout=60
                    )
                )
                assert wait_for(lambda: metric(handle, "rillet_requests_in_flight") == 2)
            tgi_rest = [json.loads(line[5:]) for line in tgi_events]
            chat_rest = [line[6:] for line in chat.iter_lines() if line.startswith("data: ")]
        assert all("token" in event for event in tgi_rest[:-1])
        assert tgi_rest[-1]["error_type"] == "generation"
        assert "fault injected" in tgi_rest[-1]["error"]
        assert chat_rest[-1] == "[DONE]"
        error = json.loads(chat_rest[-2])["error"]
        assert error["type"] == "generation" and "fault injected" in error["message"]
        assert_serves(handle)  # with the same engine:
        assert metric(handle, "rillet_engine_restarts") == 0
        assert metric(handle, "rillet_requests_running") == 0
    finally:
        handle.stop()
