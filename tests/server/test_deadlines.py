"""Deadlines on every door, on a fake engine whose queue measures are fixed by the test.

* A request the queue cannot serve in time (``X-Rillet-Max-Queue-Ms``, ``max_queue_ms``,
  ``--max-queue-ms``) is refused at once: 429 ``overloaded`` with ``retry-after`` from the
  drain time (1000 prompt tokens queued at 100 tokens/s against a 1 s budget: 10 s).
* One admitted but held in the engine before its first token past its deadline ends with
  the same error, in-band on a stream, and is aborted in the engine.
* One held after its first token past ``X-Rillet-Timeout-Ms`` ends with what it has:
  ``length`` and ``"rillet_finish_detail": "timeout"``.

The engine is held, never raced: a deadline here passes for certain.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException
from websockets.asyncio.client import connect

from app_server import Door, door, grpc_door
from fake_engine import engine_stats
from polling import poll_until
from sse_text import data_events, named_events
from triton_inputs import vllm_inputs

pytestmark = pytest.mark.timeout(30)

#: 1000 prompt tokens ahead at 100 tokens/s: ~10 s to a first token.
BUSY = engine_stats(num_queued_prompt_tokens=1000, prefill_tokens_per_s=100.0)
TGI = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
QUEUE_1S = {"x-rillet-max-queue-ms": "1000"}


async def test_a_request_the_queue_cannot_serve_in_time_is_429_with_the_drain_time() -> None:
    async with door() as d:
        d.engine.queue = BUSY
        for route, body in [
            ("/generate", TGI),
            ("/generate_stream", TGI),
            ("/v1/chat/completions", CHAT | {"stream": True}),
            ("/v2/models/fake-model/generate", {"text_input": "Hi"}),
        ]:
            response = await d.http.post(route, json=body, headers=QUEUE_1S)
            assert response.status_code == 429, (route, response.text)
            assert response.headers["retry-after"] == "10"
            assert "max_queue_ms" in response.text
        assert (await d.http.post("/?prompt=Hi", headers=QUEUE_1S)).status_code == 429
        assert (await d.http.post("/generate", json=TGI)).status_code == 200  # no deadline
        generous = {"x-rillet-max-queue-ms": "20000"}
        assert (await d.http.post("/generate", json=TGI, headers=generous)).status_code == 200
        assert d.engine.requests and d.service.in_flight == 0
        refused = {"route": "generate", "outcome": "overloaded"}
        assert d.service.metrics.registry.get_sample_value("rillet_requests_total", refused) == 1


async def test_the_server_default_applies_and_an_unmeasured_engine_admits() -> None:
    async with door(max_queue_ms=1000) as d:
        assert (await d.http.post("/generate", json=TGI)).status_code == 200  # 0.0: unknown
        d.engine.queue = BUSY
        response = await d.http.post("/generate", json=TGI)
        assert response.status_code == 429 and response.headers["retry-after"] == "10"


async def test_bad_deadline_headers_are_validation_errors() -> None:
    async with door() as d:
        for value in ("soon", "-5", "0"):
            response = await d.http.post(
                "/generate", json=TGI, headers={"x-rillet-max-queue-ms": value}
            )
            assert response.status_code == 422 and "X-Rillet-Max-Queue-Ms" in response.text
        assert d.engine.requests == []


async def _held_before_first_token(d: Door, route: str, body: dict[str, Any]) -> Any:
    d.engine.pause(before_first=True)
    response = await d.http.post(route, json=body, headers={"x-rillet-max-queue-ms": "50"})
    await poll_until(lambda: d.service.in_flight == 0)
    assert d.engine.aborted and d.engine.finished == []
    return response


async def test_no_first_token_in_time_is_overloaded_in_band_or_429() -> None:
    async with door() as d:
        response = await _held_before_first_token(d, "/generate_stream", TGI)
        assert response.status_code == 200
        [error] = data_events(response.text)
        assert (
            error["error_type"] == "overloaded" and "no first token within 50 ms" in error["error"]
        )
    async with door() as d:
        response = await _held_before_first_token(
            d, "/v1/chat/completions", CHAT | {"stream": True}
        )
        assert data_events(response.text)[-1]["error"]["type"] == "overloaded"
        assert response.text.endswith("data: [DONE]\n\n")
    async with door() as d:
        response = await _held_before_first_token(d, "/generate", TGI)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"


async def test_a_timeout_ends_the_stream_with_what_it_has() -> None:
    timeout = {"x-rillet-timeout-ms": "100"}
    async with door() as d:
        d.engine.pause()  # after each request's first token
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 5, "details": True}}
        response = await d.http.post("/generate_stream", json=body, headers=timeout)
        first, last = data_events(response.text)
        assert first["token"]["text"] == "H" and first["generated_text"] is None
        assert last["token"] == {"id": 0, "text": "", "logprob": None, "special": True}
        assert last["generated_text"] == "H" and last["index"] == 2
        assert last["details"]["finish_reason"] == "length"
        assert last["details"]["generated_tokens"] == 1
        assert last["rillet_finish_detail"] == "timeout"

        response = await d.http.post(
            "/v1/chat/completions", json=CHAT | {"stream": True}, headers=timeout
        )
        chunks = data_events(response.text)
        assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "H", ""]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["rillet_finish_detail"] == "timeout"
        assert "rillet_finish_detail" not in chunks[1]

        answer = (await d.http.post("/generate", json=TGI, headers=timeout)).json()
        assert answer == {"generated_text": "H", "rillet_finish_detail": "timeout"}
        answer = (await d.http.post("/v1/chat/completions", json=CHAT, headers=timeout)).json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["rillet_finish_detail"] == "timeout"
        assert len(d.engine.aborted) == 4 and d.service.in_flight == 0


async def test_ws_frames_carry_deadlines() -> None:
    async with door() as d:
        url = d.url.replace("http://", "ws://") + "/ws"
        async with connect(url) as sock:
            d.engine.queue = BUSY
            frame = {"type": "generate", "id": 1, "prompt": "Hi", "max_queue_ms": 1000}
            await sock.send(json.dumps(frame))
            refused = json.loads(await sock.recv())
            assert refused["error_type"] == "overloaded" and refused["retry_after"] == 10
            d.engine.queue = engine_stats()
            d.engine.pause()
            await sock.send(
                json.dumps({"type": "generate", "id": 2, "prompt": "Hi", "timeout_ms": 100})
            )
            token = json.loads(await sock.recv())
            done = json.loads(await sock.recv())
        assert token["text"] == "H"
        assert done["finish_reason"] == "length" and done["rillet_finish_detail"] == "timeout"
        assert done["usage"]["completion_tokens"] == 1


async def test_grpc_parameters_carry_deadlines() -> None:
    async with grpc_door() as d, tc_aio.InferenceServerClient(d.target) as client:
        d.engine.queue = BUSY
        with pytest.raises(InferenceServerException) as refused:
            await client.infer(
                "fake-model", vllm_inputs("Hi", stream=False), parameters={"max_queue_ms": 1000}
            )
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "max_queue_ms" in str(refused.value)
        d.engine.queue = engine_stats()
        d.engine.pause()
        result = await client.infer(
            "fake-model", vllm_inputs("Hi", stream=False), parameters={"timeout_ms": 100}
        )
        response = result.get_response()
        assert response.parameters["rillet_finish_detail"].string_param == "timeout"
        assert result.as_numpy("text_output")[0] == b"HiH"  # the prompt, then the one token


MESSAGES = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
RESPONSES = {"model": "m", "input": "Hi", "max_output_tokens": 5}
TRITON_STREAM = {"text_input": "Hi", "stream": True, "parameters": {"max_tokens": 5}}


async def test_anthropic_responses_and_completions_refuse_in_their_own_shape() -> None:
    async with door() as d:
        d.engine.queue = BUSY
        for body in (MESSAGES, MESSAGES | {"stream": True}):
            response = await d.http.post("/v1/messages", json=body, headers=QUEUE_1S)
            assert response.status_code == 429 and response.headers["retry-after"] == "10"
            error = response.json()
            assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
        for route, body in [
            ("/v1/responses", RESPONSES | {"stream": True}),
            ("/v1/completions", {"prompt": "Hi", "stream": True}),
        ]:
            response = await d.http.post(route, json=body, headers=QUEUE_1S)
            assert response.status_code == 429 and response.headers["retry-after"] == "10"
            assert response.json()["error"]["type"] == "overloaded"
        assert d.engine.requests == [] and d.service.in_flight == 0


async def test_no_first_token_in_time_is_in_band_on_anthropic_responses_and_triton() -> None:
    async with door() as d:
        response = await _held_before_first_token(d, "/v1/messages", MESSAGES | {"stream": True})
        names = [name for name, _ in named_events(response.text)]
        assert names == ["message_start", "error"]
        assert named_events(response.text)[-1][1]["error"]["type"] == "overloaded_error"
    async with door() as d:
        response = await _held_before_first_token(d, "/v1/responses", RESPONSES | {"stream": True})
        got = named_events(response.text)
        assert [name for name, _ in got][-2:] == ["error", "response.failed"]
        assert got[-1][1]["response"]["error"]["code"] == "overloaded"
    async with door() as d:
        route = "/v2/models/fake-model/generate_stream"
        response = await _held_before_first_token(d, route, TRITON_STREAM)
        assert data_events(response.text) == [
            {"error": "no first token within 50 ms (max_queue_ms)"}
        ]


async def test_a_timeout_ends_every_other_door_with_what_it_has_and_says_so() -> None:
    """Anthropic (``max_tokens``), Responses (``incomplete``), completions and Triton HTTP
    carry ``rillet_finish_detail``; plain text has no place for it and just ends."""
    timeout = {"x-rillet-timeout-ms": "100"}
    async with door() as d:
        d.engine.pause()  # after each request's first token
        answer = (await d.http.post("/v1/messages", json=MESSAGES, headers=timeout)).json()
        assert answer["content"] == [{"type": "text", "text": "H"}]
        assert answer["stop_reason"] == "max_tokens" and answer["usage"]["output_tokens"] == 1
        assert answer["rillet_finish_detail"] == "timeout"

        stream = MESSAGES | {"stream": True}
        got = named_events((await d.http.post("/v1/messages", json=stream, headers=timeout)).text)
        [delta] = [e for name, e in got if name == "message_delta"]
        assert delta["delta"]["stop_reason"] == "max_tokens"
        assert delta["rillet_finish_detail"] == "timeout" and got[-1][0] == "message_stop"

        for body in (RESPONSES, RESPONSES | {"stream": True}):
            response = await d.http.post("/v1/responses", json=body, headers=timeout)
            if body.get("stream"):
                name, event = named_events(response.text)[-1]
                assert name == "response.incomplete"
                answer = event["response"]
            else:
                answer = response.json()
            assert answer["status"] == "incomplete" and answer["usage"]["output_tokens"] == 1
            assert answer["output"][0]["content"][0]["text"] == "H"
            assert answer["rillet_finish_detail"] == "timeout"

        completion = {"prompt": "Hi", "max_tokens": 5, "stream": True}
        response = await d.http.post("/v1/completions", json=completion, headers=timeout)
        chunks = data_events(response.text)
        assert [c["choices"][0]["text"] for c in chunks] == ["H", ""]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["rillet_finish_detail"] == "timeout"

        route = "/v2/models/fake-model/generate_stream"
        response = await d.http.post(route, json=TRITON_STREAM, headers=timeout)
        *_, last = data_events(response.text)
        assert last["rillet_finish_detail"] == "timeout"

        response = await d.http.post("/?prompt=Hi", headers=timeout)
        assert response.status_code == 200 and response.text == "H"
        assert len(d.engine.aborted) == 7 and d.service.in_flight == 0
