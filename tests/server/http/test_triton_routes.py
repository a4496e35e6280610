"""Triton's HTTP routes on a fake engine: generate, generate_stream (SSE, errors in-band
after the first event), health and metadata."""

from __future__ import annotations

import json

import pytest

from app_server import door
from polling import poll_until

pytestmark = pytest.mark.timeout(30)

MODEL = "fake-model"


async def test_generate_answers_one_json_object() -> None:
    async with door() as d:
        body = {"id": "7", "text_input": "Hi", "parameters": {"max_tokens": 3}}
        answer = await d.http.post(f"/v2/models/{MODEL}/generate", json=body)
        assert answer.status_code == 200
        # Not streamed, the prompt starts the answer, as vLLM's backend does.
        assert answer.json() == {
            "model_name": MODEL,
            "model_version": "1",
            "id": "7",
            "text_output": "HiHel",
        }
        body = {
            "text_input": "Hi",
            "parameters": {
                "max_tokens": 2,
                "exclude_input_in_output": True,
                "return_finish_reason": True,
                "return_num_output_tokens": True,
            },
        }
        versioned = await d.http.post(f"/v2/models/{MODEL}/versions/1/generate", json=body)
        assert versioned.json() == {
            "model_name": MODEL,
            "model_version": "1",
            "text_output": "He",
            "finish_reason": "length",
            "num_output_tokens": 2,
        }
        streaming = await d.http.post(
            f"/v2/models/{MODEL}/generate",
            json={"text_input": "Hi", "parameters": {"stream": True}},
        )
        assert streaming.status_code == 400 and "generate_stream" in streaming.json()["error"]


async def test_generate_stream_sends_one_event_per_delta() -> None:
    async with door() as d:
        body = {"text_input": "Hi", "parameters": {"stream": True, "max_tokens": 3}}
        async with d.http.stream(
            "POST", f"/v2/models/{MODEL}.streaming/generate_stream", json=body
        ) as response:
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            events = [json.loads(line[6:]) async for line in response.aiter_lines() if line]
        assert [e["text_output"] for e in events] == ["H", "e", "l"]
        assert events[0] == {
            "model_name": f"{MODEL}.streaming",
            "model_version": "1",
            "text_output": "H",
        }


async def test_errors_before_and_after_the_stream_starts() -> None:
    async with door() as d:
        unknown = await d.http.post("/v2/models/nope/generate_stream", json={"text_input": "Hi"})
        assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
        missing = await d.http.post(f"/v2/models/{MODEL}/generate", json={"parameters": {}})
        assert missing.status_code == 400
        assert missing.json() == {"error": "input 'text_input' is required"}
        d.engine.fail_after = (1, RuntimeError("boom"))  # not a RilletError: a bug mid-stream
        body = {"text_input": "Hi", "parameters": {"stream": True}}
        async with d.http.stream("POST", f"/v2/models/{MODEL}/generate_stream", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line]
        assert events[0]["text_output"] == "H" and "boom" in events[1]["error"]
        await poll_until(lambda: d.service.in_flight == 0)


async def test_health_and_metadata() -> None:
    async with door() as d:
        assert (await d.http.get("/v2/health/live")).status_code == 200
        assert (await d.http.get("/v2/health/ready")).status_code == 200
        assert (await d.http.get(f"/v2/models/{MODEL}/ready")).status_code == 200
        unknown = await d.http.get("/v2/models/nope/ready")
        assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
        assert (await d.http.get("/v2")).json()["name"] == "rillet"
        metadata = (await d.http.get(f"/v2/models/{MODEL}")).json()
        assert metadata["inputs"][0] == {"name": "text_input", "datatype": "BYTES", "shape": [1]}
        assert (await d.http.get("/v2/models/nope")).status_code == 404
        d.service.draining = True
        assert (await d.http.get("/v2/health/ready")).status_code == 503
