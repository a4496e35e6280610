"""rillet on a real local Ray cluster (``ray.init(num_cpus=2)``): ``rillet.deploy.ray:app`` as
2 replicas of the bundled model at 1 thread each, behind Serve's HTTP and gRPC proxies.

Each replica's engine admits 2 streams here (``max_concurrent_requests=2``), so Serve gives
each replica 2 requests at a time (``max_ongoing_requests`` follows it), and each proxy
queues 2 more (``max_queued_requests=2``). Requests are held where a test needs them by
freezing the replicas' engine processes (SIGSTOP), as the single-server tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests

from ray_replicas import (
    Cluster,
    assert_tritonclient_streams,
    frozen_engines,
    replica_metrics,
    serve_cluster,
)
from server_process import metric_value
from triton_inputs import vllm_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # 2 queued, not 1: two requests that arrive together may both count as queued for a
    # moment while Serve's router picks replicas (the tutorial test sends two at once).
    with serve_cluster(
        num_replicas=2, threads=1, max_concurrent_requests=2, max_queued_requests=2
    ) as running:
        yield running


LONG_TGI = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}
SHORT_TGI = {"inputs": "The sea is", "parameters": {"max_new_tokens": 4}}


def test_both_replicas_serve_and_report_healthy(cluster: Cluster) -> None:
    from ray import serve

    status = serve.status().applications["rillet"]
    deployment = status.deployments["rillet"]
    assert deployment.status == "HEALTHY" and deployment.replica_states == {"RUNNING": 2}
    # Serve's router picks between two idle replicas at random: 40 requests all landing on
    # one of them has a probability of 2**-39.
    names = set()
    for _ in range(40):
        answer = httpx.post(cluster.url + "/generate", json=SHORT_TGI, timeout=60)
        assert answer.status_code == 200
        names.add(answer.headers["x-rillet-replica"])
    assert len(names) == 2


def test_streams_arrive_incrementally_through_the_proxy(cluster: Cluster) -> None:
    tgi = {"inputs": "The sea is", "parameters": {"max_new_tokens": 12}}
    # Greedy: a sampled answer may hold tokens that end mid-character, which arrive merged
    # into the next chunk, so the chunk count would vary from run to run.
    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    for route, body in (("/generate_stream", tgi), ("/v1/chat/completions", chat)):
        with httpx.stream("POST", cluster.url + route, json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            with frozen_engines():
                # The engine is frozen mid-answer: what arrived came before the rest exists.
                assert "generated_text" not in first or '"generated_text":null' in first
            events = [first, *(line for line in lines if line.startswith("data:"))]
        assert len(events) >= 12, route
    from websockets.sync.client import connect

    with connect(cluster.url.replace("http", "ws") + "/ws") as sock:
        frame = {"type": "generate", "id": 1, "prompt": "The sea is", "max_tokens": 12}
        sock.send(json.dumps(frame | {"ignore_eos": True}))
        first_frame = json.loads(sock.recv())
        with frozen_engines():
            assert first_frame["type"] == "token"
        frames = [first_frame]
        while frames[-1]["type"] == "token":
            frames.append(json.loads(sock.recv()))
    assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 12
    assert len(frames) > 2


def test_a_disconnect_aborts_in_the_replica(cluster: Cluster) -> None:
    with contextlib.ExitStack() as thaw:
        with httpx.stream(
            "POST", cluster.url + "/generate_stream", json=LONG_TGI, timeout=60
        ) as response:
            replica = response.headers["x-rillet-replica"]
            next(line for line in response.iter_lines() if line.startswith("data:"))
            thaw.enter_context(frozen_engines())  # running, and it stays so until the abort
        before = replica_metrics(cluster.url, replica, lambda text: True)
    after = replica_metrics(
        cluster.url,
        replica,
        lambda text: (
            metric_value(text, "rillet_requests_running") == 0
            and metric_value(text, "rillet_requests_in_flight") == 0
        ),
    )
    cancelled = 'rillet_requests_total{outcome="cancelled",route="generate_stream"}'
    assert metric_value(after, cancelled) >= metric_value(before, cancelled)
    assert metric_value(after, cancelled) >= 1


def chat_answer(cluster: Cluster, prompt: str | list[dict[str, str]], max_tokens: int) -> str:
    """The chat route's greedy answer to one user message or a whole conversation."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    answer = httpx.post(cluster.url + "/v1/chat/completions", json=body, timeout=120).json()
    return str(answer["choices"][0]["message"]["content"])


def test_the_tutorials_clients_work_unmodified(cluster: Cluster) -> None:
    # The text client, from two "terminals" at once (the tutorial's batching check).
    prompts = ["Introduce yourself to me!", "Tell me a story about dogs."]
    texts: dict[str, str] = {}

    def text_client(prompt: str) -> None:
        try:
            response = requests.post(
                f"{cluster.url}/?prompt={prompt}&max_new_tokens=48", stream=True
            )
            response.raise_for_status()
            texts[prompt] = "".join(response.iter_content(chunk_size=None, decode_unicode=True))
        except Exception as exc:  # shown by the assertion below
            texts[prompt] = repr(exc)

    terminals = [threading.Thread(target=text_client, args=(p,)) for p in prompts]
    for terminal in terminals:
        terminal.start()
    for terminal in terminals:
        terminal.join(120)
    for prompt in prompts:
        assert texts[prompt] == chat_answer(cluster, prompt, 48) and texts[prompt]

    # The WebSocket chat client: two turns on one socket.
    from websockets.sync.client import connect

    replies = []
    turns = ("What is the capital of France?", "What was my previous question?")
    with connect(cluster.url.replace("http", "ws")) as websocket:
        for turn in turns:
            websocket.send(turn)
            pieces = []
            while (message := websocket.recv()) != "<<Response Finished>>":
                pieces.append(message)
            replies.append("".join(pieces))
    # The second reply saw the first turn: it is not the answer to the second question alone.
    # (Whether the model quotes the first question back is up to its numerics.)
    assert replies[1] != chat_answer(cluster, turns[1], 512)


def test_tritonclient_streams_through_serves_grpc_proxy(cluster: Cluster) -> None:
    assert_tritonclient_streams(cluster.url, cluster.grpc_target, cluster.model)


async def test_past_the_queue_a_request_is_refused_at_once(cluster: Cluster) -> None:
    """Last in the module: it fills every slot. Engines frozen, nothing can finish: 4 streams
    held (2 per replica; each one's headers mean a replica took it), then each proxy queues
    2 more and refuses the rest at once: 429 with retry-after over HTTP, RESOURCE_EXHAUSTED
    over gRPC."""
    import tritonclient.grpc as tc

    from rillet.client.errors import OverloadedError, parse_error

    refusals: asyncio.Queue[httpx.Response] = asyncio.Queue()

    async def extra(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/generate_stream", json=LONG_TGI) as response:
            if response.status_code == 200:  # it was queued: once admitted, a token, then close
                await anext(
                    line async for line in response.aiter_lines() if line.startswith("data:")
                )
            else:
                await response.aread()
                await refusals.put(response)

    grpc_answers: queue.Queue[Any] = queue.Queue()
    unary = vllm_inputs("The sea is", stream=False, sampling={"max_tokens": 4})
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=120) as client,
        contextlib.AsyncExitStack() as held,
    ):
        with frozen_engines():
            for _ in range(4):
                stream = client.stream("POST", "/generate_stream", json=LONG_TGI)
                assert (await held.enter_async_context(stream)).status_code == 200
            extras = [asyncio.ensure_future(extra(client)) for _ in range(4)]
            refused = await refusals.get()  # only a refusal can answer while frozen
            with tc.InferenceServerClient(cluster.grpc_target) as triton:
                for _ in range(3):
                    triton.async_infer(
                        cluster.model,
                        unary,
                        callback=lambda result, error: grpc_answers.put((result, error)),
                    )
                result, grpc_error = await asyncio.to_thread(grpc_answers.get, timeout=120)
            # Leaving the block closes the channel: the gRPC requests still queued go too.
        await held.aclose()  # the held streams end: their slots free up for the queued ones
        await asyncio.gather(*extras)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "backpressure" in refused.text  # Serve's own body: Serve refused it
    error = parse_error(429, refused.text, retry_after=1.0)
    assert isinstance(error, OverloadedError)  # what rillet.client raises for it
    assert result is None and grpc_error.status() == "StatusCode.RESOURCE_EXHAUSTED"
