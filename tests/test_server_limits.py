"""The global concurrency limit (429, never 503) and the API key, on a server started with
``--max-concurrent-requests 1 --api-key test-key`` (the ``limited_server`` fixture)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import OverloadedError

from server_process import LIMITED_API_KEY, LIMITED_AUTH, ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "stream": True}),
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}),
]


def in_flight(server: ServerHandle) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(r"^rillet_requests_in_flight (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


@contextlib.contextmanager
def holding_the_only_slot(server: ServerHandle) -> Iterator[None]:
    body = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}
    with httpx.stream(
        "POST", server.url + "/generate_stream", json=body, headers=LIMITED_AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # keep it referenced: dropping it closes the connection
        next(line for line in lines if line.startswith("data:"))
        yield
    deadline = time.monotonic() + 15
    while in_flight(server) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_overload_is_429_on_every_route_then_capacity_comes_back(
    limited_server: ServerHandle,
) -> None:
    url = limited_server.url
    with holding_the_only_slot(limited_server):
        for route, body in REQUESTS:
            response = httpx.post(url + route, json=body, headers=LIMITED_AUTH)
            assert response.status_code == 429, (route, response.text)
            assert response.headers["retry-after"] == "1"
            if route.startswith("/v1/"):
                error = response.json()["error"]
                assert error["message"] == "Model is overloaded" and error["code"] == 429
            else:
                assert response.json() == {
                    "error": "Model is overloaded",
                    "error_type": "overloaded",
                }
        plain = httpx.post(url + "/?prompt=Hi", headers=LIMITED_AUTH)
        assert plain.status_code == 429
        client = openai.OpenAI(base_url=url + "/v1", api_key=LIMITED_API_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="m", prompt="Hi", max_tokens=2)
        hub = InferenceClient(url, token=LIMITED_API_KEY)
        with pytest.raises(OverloadedError):
            hub.text_generation("Hi", max_new_tokens=2)
    assert in_flight(limited_server) == 0
    for route, body in REQUESTS:
        assert httpx.post(url + route, json=body, headers=LIMITED_AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200


def test_generation_routes_need_the_key_and_info_routes_stay_open(
    limited_server: ServerHandle,
) -> None:
    url = limited_server.url
    for route, body in REQUESTS:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
            response = httpx.post(url + route, json=body, headers=headers)
            assert response.status_code == 401, (route, headers)
            body = response.json()
            kind = body["error"]["type"] if route.startswith("/v1/") else body["error_type"]
            assert kind == "authentication"
    assert httpx.post(url + "/tokenize", json={"inputs": "Hi"}).status_code == 401
    for path in ("/health", "/info", "/metrics", "/v1/models"):
        assert httpx.get(url + path).status_code == 200, path
    lower = {"authorization": f"bearer {LIMITED_API_KEY}"}
    assert httpx.post(url + "/generate", json=REQUESTS[0][1], headers=lower).status_code == 200
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    assert wrong.models.list().data  # open, as in TGI
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="m", prompt="Hi", max_tokens=2)
