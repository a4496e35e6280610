"""schemathesis against rillet's own OpenAPI document, on a real ``rillet serve``.

Every operation in ``/openapi.json`` gets generated requests, valid and invalid (schemathesis's
positive and negative modes), sent over loopback to a real server on a tiny random-weight
model (so a generation is milliseconds, and ``--max-total-tokens 64`` bounds it). Every answer
must be a 2xx, or a 4xx with a JSON error in its route's format: never a 5xx, a hang or a
crash, and after all of it the server is healthy with nothing left in flight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis import GenerationMode

from server_process import ServerHandle, metric, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def fuzzed_server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server(
        ["--model", str(tiny_model_dir), "--max-total-tokens", "64", "--grpc-port", "0"]
    )
    yield handle
    # Whatever was sent, the server is still up, serving, and holds nothing.
    assert handle.proc.poll() is None, handle.log()
    assert httpx.get(handle.url + "/health").status_code == 200
    assert metric(handle, "rillet_requests_in_flight") == 0
    assert metric(handle, "rillet_requests_running") == 0
    handle.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: ServerHandle) -> Any:
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")


#: Every operation of the document; a route added without being fuzzed fails the first test.
OPERATIONS = [
    "POST /generate",
    "POST /generate_stream",
    "POST /",
    "POST /tokenize",
    "GET /info",
    "GET /health",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "GET /v1/models",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    "POST /v1/responses",
    "GET /v1/responses/{response_id}",
    "POST /v2/models/{model}/generate",
    "POST /v2/models/{model}/generate_stream",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2",
    "GET /v2/models/{model}",
    "GET /v2/models/{model}/ready",
    "GET /streams/{sid}",
]


def test_the_document_lists_every_route_with_its_body(api_schema: Any) -> None:
    found = [f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations()]
    assert sorted(found) == sorted(OPERATIONS)
    for operation in OPERATIONS:
        method, path = operation.split(" ")
        has_body = bool(api_schema[path][method].body)
        assert has_body == (method == "POST"), operation


#: What negative mode can break: a body (the other inputs are strings in a path: any is valid).
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if op.startswith("POST")
]


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_every_operation_answers_2xx_or_a_4xx_json_error(
    api_schema: Any, operation: str, mode: GenerationMode
) -> None:
    method, path = operation.split(" ")

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=30)
    def answers(case: Any) -> None:
        response = case.call(timeout=60)
        status = response.status_code
        assert status < 500, (status, response.text[:500])
        content_type = ",".join(response.headers.get("content-type", []))
        if status >= 400:
            assert content_type.startswith("application/json"), (status, content_type)
            assert_error_shape(path, response.json())
        elif content_type.startswith("text/event-stream"):
            assert_clean_stream(response.text)

    answers()


def assert_error_shape(path: str, body: Any) -> None:
    """The route family's error JSON: Anthropic's, OpenAI's object, Triton's message, TGI's
    pair."""
    assert isinstance(body, dict), body
    error = body.get("error")
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(error, dict), body
        assert isinstance(error["message"], str) and isinstance(error["type"], str), body
    elif path.startswith("/v1/"):
        assert isinstance(error, dict), body
        assert isinstance(error["message"], str) and isinstance(error["type"], str), body
        assert isinstance(error["code"], int), body
    elif path.startswith("/v2"):
        assert isinstance(error, str), body
    else:
        assert isinstance(error, str) and isinstance(body.get("error_type"), str), body


def assert_clean_stream(text: str) -> None:
    """Every event of a 2xx stream is JSON (or ``[DONE]``) and none is an internal error
    (Anthropic's ``api_error``, or a Responses ``error`` event's ``code``).

    Lines end at CR, LF or CRLF only, as SSE says: ``str.splitlines`` would also split at
    U+2028, U+0085 and friends, which JSON leaves raw inside a token's text.
    """
    for line in re.split(r"\r\n|\r|\n", text):
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            continue
        event = json.loads(data)
        failures = ("internal", "generation", "incomplete_generation", "api_error")
        if isinstance(event, dict) and event.get("type") == "error":  # Responses, Anthropic
            assert event.get("code") not in failures, event
        error = event.get("error") if isinstance(event, dict) else None
        if error is not None:
            kind = error.get("type") if isinstance(error, dict) else event.get("error_type")
            assert kind not in failures, event
