"""TGI's native routes on a real ``rillet serve``, checked on the wire (httpx, raw bytes)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server_process import ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: SmolLM2's chat template around a question it answers in 7 tokens, then <|im_end|> (EOS).
EOS_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT = "Hello, my name is"


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Parse a TGI stream strictly: only ``data: <json>\\n\\n`` events (keep-alives aside)."""
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        if block == b":":
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block
        events.append(json.loads(block.removeprefix(b"data: ")))
    return events


def stream(server: ServerHandle, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        return sse_events(response.read())


def post(server: ServerHandle, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_generate_stream_events_end_with_eos_and_details(server: ServerHandle) -> None:
    body = {"inputs": EOS_PROMPT, "parameters": {"max_new_tokens": 32, "details": True}}
    events = stream(server, "/generate_stream", body)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(set(e) == {"index", "token", "generated_text", "details"} for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["token"] == {**last["token"], "id": 2, "text": "<|im_end|>", "special": True}
    assert last["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": len(events),
        "seed": None,
        "input_length": last["details"]["input_length"],
    }
    visible = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert last["generated_text"] == visible and visible.strip()
    assert all(isinstance(e["token"]["logprob"], float) for e in events)

    answer = post(server, "/generate", body).json()
    assert answer["generated_text"] == last["generated_text"]
    assert [t["id"] for t in answer["details"]["tokens"]] == [e["token"]["id"] for e in events]
    assert answer["details"]["finish_reason"] == "eos_token"
    assert answer["details"]["prefill"] == [] and "top_tokens" not in answer["details"]


def test_one_event_per_token_even_inside_a_utf8_character(server: ServerHandle) -> None:
    body = {"inputs": "Here are some emojis: 😀 🎉 🚀", "parameters": {"max_new_tokens": 12}}
    events = stream(server, "/generate_stream", body)
    texts = [e["token"]["text"] for e in events]
    assert len(events) == 12 and "" in texts  # each emoji spans several byte tokens
    assert "".join(texts) == events[-1]["generated_text"]
    assert "\ufffd" not in "".join(texts[:-1])


def test_compat_route_dispatches_on_stream(server: ServerHandle) -> None:
    params = {"max_new_tokens": 6, "details": True}
    array = post(server, "/", {"inputs": PROMPT, "parameters": params}).json()
    assert isinstance(array, list) and len(array) == 1
    # On "/" an unset return_full_text means true (TGI, for a text-generation model).
    assert array[0]["generated_text"].startswith(PROMPT)
    plain = post(
        server, "/", {"inputs": PROMPT, "parameters": {**params, "return_full_text": False}}
    )
    assert PROMPT + plain.json()[0]["generated_text"] == array[0]["generated_text"]
    events = stream(server, "/", {"inputs": PROMPT, "parameters": params, "stream": True})
    assert events[-1]["generated_text"] == array[0]["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 6


def test_stop_sequence_is_kept_in_generated_text(server: ServerHandle) -> None:
    body = {"inputs": EOS_PROMPT, "parameters": {"max_new_tokens": 32, "stop": ["is "]}}
    answer = post(
        server, "/generate", {**body, "parameters": {**body["parameters"], "details": True}}
    )
    assert answer.json()["generated_text"].endswith("is ")
    assert answer.json()["details"]["finish_reason"] == "stop_sequence"
    body["parameters"]["details"] = True
    events = stream(server, "/generate_stream", body)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["generated_text"] == answer.json()["generated_text"]


def test_top_n_tokens_and_decoder_input_details(server: ServerHandle) -> None:
    params = {"max_new_tokens": 4, "details": True, "top_n_tokens": 3}
    events = stream(server, "/generate_stream", {"inputs": PROMPT, "parameters": params})
    for event in events:
        top = event["top_tokens"]
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert event["token"]["id"] == top[0]["id"]  # greedy picks the most likely
    details = post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {**params, "decoder_input_details": True}},
    ).json()["details"]
    assert len(details["top_tokens"]) == 4 and all(len(t) == 3 for t in details["top_tokens"])
    prefill = details["prefill"]
    assert len(prefill) == events[-1]["details"]["input_length"]
    assert prefill[0]["logprob"] is None and all(p["logprob"] < 0 for p in prefill[1:])
    assert "".join(p["text"] for p in prefill) == PROMPT


def test_sampling_reports_its_seed_and_a_seed_reproduces(server: ServerHandle) -> None:
    params = {"max_new_tokens": 8, "details": True, "do_sample": True, "seed": 7}
    first = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    again = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    assert first["generated_text"] == again["generated_text"]
    assert first["details"]["seed"] == 7
    del params["seed"]
    assert isinstance(
        post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()["details"][
            "seed"
        ],
        int,
    )
    # Lenient where TGI is strict: temperature 0 is greedy and top_p 1.0 is accepted.
    greedy = {"max_new_tokens": 8, "details": True, "temperature": 0, "top_p": 1.0}
    answer = post(server, "/generate", {"inputs": PROMPT, "parameters": greedy}).json()
    assert answer["details"]["seed"] is None


def test_truncate_keeps_the_last_tokens(server: ServerHandle) -> None:
    params = {"max_new_tokens": 2, "details": True, "truncate": 3}
    events = stream(server, "/generate_stream", {"inputs": PROMPT * 5, "parameters": params})
    assert events[-1]["details"]["input_length"] == 3


def test_decoder_input_details_refused_when_streaming(server: ServerHandle) -> None:
    body = {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}
    response = post(server, "/generate_stream", body)
    assert response.status_code == 422 and "streaming" in response.json()["error"]


def test_tokenize_info_health(server: ServerHandle) -> None:
    tokens = post(server, "/tokenize", {"inputs": "héllo world"}).json()
    assert [t["text"] for t in tokens] == ["h", "é", "llo", " world"]
    assert [(t["start"], t["stop"]) for t in tokens] == [(0, 1), (1, 3), (3, 6), (6, 12)]
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] and info["max_stop_sequences"] == 4
    assert info["max_input_tokens"] < info["max_total_tokens"]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.content == b""


def test_metrics_expose_the_issue_series(server: ServerHandle) -> None:
    post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "rillet_requests_running",
        "rillet_requests_waiting",
        "rillet_kv_cache_usage_ratio",
        "rillet_time_to_first_token_seconds_bucket",
        "rillet_inter_token_latency_seconds_bucket",
        "rillet_request_duration_seconds_bucket",
        "rillet_request_queue_seconds_bucket",
        "rillet_prompt_tokens_total",
        "rillet_generated_tokens_total",
        'rillet_requests_total{outcome="success",route="generate"}',
    ):
        assert name in text, name
    # The queue histogram is fed when the engine first schedules a request.
    queue_count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("rillet_request_queue_seconds_count")
    )
    assert queue_count >= 1
