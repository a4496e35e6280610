"""The gRPC door on a real ``rillet serve`` with the bundled model: stock tritonclient
(sync and aio) and rillet's StreamingClient give the HTTP routes' greedy text, a cancelled
stream frees the engine, Triton's HTTP generate agrees, the quick start runs, and gRPC on
the HTTP port is refused.
(Framing, errors, overload and the key on a held fake engine:
``server/kserve/test_grpc_server.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio

from polling import poll_until_sync
from rillet.client import AsyncStreamingClient, StreamingClient
from server_process import ServerHandle, free_port, frozen_engine, metric
from triton_inputs import vllm_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = {"sea": "The sea is", "count": "Count: one, two,"}


def model_of(server: ServerHandle) -> str:
    return str(httpx.get(server.url + "/info").json()["model_id"])


def completion(server: ServerHandle, prompt: str, max_tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    return str(answer["choices"][0]["text"])


def test_tritonclient_streams_the_http_routes_greedy_text(server: ServerHandle) -> None:
    model = model_of(server)
    results: queue.Queue[Any] = queue.Queue()
    texts: dict[str, str] = dict.fromkeys(PROMPTS, "")
    num_responses: dict[str, int] = dict.fromkeys(PROMPTS, 0)
    with tc.InferenceServerClient(server.grpc_target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for key, prompt in PROMPTS.items():  # two requests interleaved on one stream
            sampling = {"max_tokens": 24, "temperature": 0}
            client.async_stream_infer(model, vllm_inputs(prompt, sampling=sampling), request_id=key)
        finished: set[str] = set()
        while finished != set(PROMPTS):
            result, error = results.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            texts[response.id] += result.as_numpy("text_output")[0].decode()
            num_responses[response.id] += 1
            if response.parameters["triton_final_response"].bool_param:
                finished.add(response.id)
        client.stop_stream()
    for key, prompt in PROMPTS.items():
        assert texts[key] == completion(server, prompt, 24) and num_responses[key] > 5


async def test_aio_client_and_the_streaming_client(server: ServerHandle) -> None:
    model = model_of(server)
    expected = completion(server, PROMPTS["sea"], 16)
    async with tc_aio.InferenceServerClient(server.grpc_target) as client:

        async def one() -> AsyncIterator[dict[str, Any]]:
            sampling = {"max_tokens": 16, "temperature": 0}
            yield {
                "model_name": model,
                "inputs": vllm_inputs(PROMPTS["sea"], sampling=sampling),
                "request_id": "a",
            }

        text = ""
        async for result, error in client.stream_infer(one()):
            assert error is None, error
            text += result.as_numpy("text_output")[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    assert text == expected

    pieces: list[str] = []
    with StreamingClient(model + ".streaming", url=server.grpc_target) as streaming:
        whole = await asyncio.to_thread(
            streaming.generate, PROMPTS["sea"], pieces.append, max_tokens=16, temperature=0
        )
    assert whole == "".join(pieces) == expected and len(pieces) > 5
    messages = [{"role": "user", "content": "Name three colors."}]
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 16, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["message"]["content"]
    async with AsyncStreamingClient(model, url=server.grpc_target) as ours:
        assert await ours.generate(messages=messages, max_tokens=16, temperature=0) == chat


def test_a_cancelled_stream_frees_the_engine(server: ServerHandle) -> None:
    model = model_of(server)
    cancelled = 'rillet_requests_total{outcome="cancelled",route="grpc_stream"}'
    before = metric(server, cancelled)
    results: queue.Queue[Any] = queue.Queue()
    endless = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    with contextlib.ExitStack() as thaw, tc.InferenceServerClient(server.grpc_target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(
            model, vllm_inputs(PROMPTS["count"], sampling=endless), request_id="long"
        )
        result, error = results.get(timeout=60)
        assert error is None and result.get_response().id == "long"
        thaw.enter_context(frozen_engine(server))  # running, and it stays so
        assert metric(server, "rillet_requests_running") == 1
        client.stop_stream(cancel_requests=True)
    poll_until_sync(lambda: metric(server, "rillet_requests_running") == 0)
    assert metric(server, "rillet_requests_in_flight") == 0
    assert metric(server, cancelled) == before + 1


def test_triton_http_generate_and_generate_stream(server: ServerHandle) -> None:
    model = model_of(server)
    expected = completion(server, PROMPTS["count"], 12)
    parameters = {"max_tokens": 12, "temperature": 0, "exclude_input_in_output": True}
    body = {"text_input": PROMPTS["count"], "parameters": parameters}
    whole = httpx.post(f"{server.url}/v2/models/{model}/generate", json=body, timeout=60).json()
    assert whole["text_output"] == expected
    body["parameters"] = {**parameters, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v2/models/{model}/generate_stream", json=body, timeout=60
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    assert "".join(e["text_output"] for e in events) == expected and len(events) > 5


def test_the_quick_start_prints_a_reply_token_by_token(server: ServerHandle) -> None:
    prompt = "Name three colors."
    run = subprocess.run(
        [
            str(ROOT / "examples" / "streaming" / "run.sh"),
            prompt,
            *("--url", server.grpc_target, "--http", server.url),
            *("--max-tokens", "16", "--temperature", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=60,
    ).json()["choices"][0]["message"]["content"]
    assert run.stdout == chat + "\n"


def test_grpc_on_the_http_port_fails_loudly(tiny_model_dir: Path) -> None:
    """Not two listeners sharing one port's connections: the server exits and says why."""
    port = free_port()
    command = [sys.executable, "-m", "rillet", "serve", "--model", str(tiny_model_dir)]
    command += ["--port", str(port), "--grpc-port", str(port)]
    done = subprocess.run(command, capture_output=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot serve gRPC on port {port}" in done.stderr.decode()
