"""The replicas of a local Ray Serve app, found by their process titles, and a way to hold
their engines still (for the Ray tests, whichever ingress Serve runs)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from server_process import child_pids, free_port
from triton_inputs import vllm_inputs


@dataclass
class Cluster:
    """A local Serve app of rillet: its HTTP address, its gRPC target, its model's name."""

    url: str
    grpc_target: str
    model: str


@contextlib.contextmanager
def serve_cluster(haproxy: bool = False, **args: Any) -> Iterator[Cluster]:
    """A local Ray cluster (2 CPUs) serving ``rillet.deploy.ray:app`` with these builder
    arguments over HTTP and gRPC, on free loopback ports; with ``haproxy``, behind Serve's
    HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``, which Serve reads when its controller
    starts: the local cluster's processes inherit it from this one)."""
    import ray
    from ray import serve

    from rillet.deploy.ray import RayAppArgs, app

    flag = "RAY_SERVE_ENABLE_HA_PROXY"
    if haproxy:
        os.environ[flag] = "1"
    http_port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={
                "port": grpc_port,
                "grpc_servicer_functions": [
                    "rillet.kserve.rpc.add_GRPCInferenceServiceServicer_to_server"
                ],
            },
        )
        serve.run(app(RayAppArgs(**args)), name="rillet", route_prefix="/")
        url = f"http://127.0.0.1:{http_port}"
        model = httpx.get(url + "/info", timeout=30).json()["model_id"]
        yield Cluster(url, f"127.0.0.1:{grpc_port}", model)
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(flag, None)


def replica_pids() -> list[int]:
    """The replicas' worker processes: Ray titles them ``ray::ServeReplica:<app>:<name>``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(b"ray::ServeReplica:rillet"):
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def frozen_engines() -> Iterator[None]:
    """SIGSTOP every replica's engine process until the block exits: their requests can
    neither advance nor finish, while Serve's ingress and the replicas' Python keep going."""
    pids = [child for pid in replica_pids() for child in child_pids(pid)]
    assert pids, "each replica runs its engine in a child process"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def replica_metrics(url: str, replica: str, predicate: Any) -> str:
    """/metrics of ``replica`` once ``predicate(text)`` holds (Serve routes each scrape to
    any replica; 120 s bound the wait, and the last scrape is shown if it runs out)."""
    deadline, last = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        response = httpx.get(url + "/metrics", timeout=30)
        if response.headers["x-rillet-replica"] == replica:
            last = response.text
            if predicate(last):
                return last
        time.sleep(0.05)
    running = [line for line in last.splitlines() if line.startswith("rillet_requests_")]
    raise AssertionError(f"replica {replica} never got there: {running}")


def assert_tritonclient_streams(url: str, grpc_target: str, model: str) -> None:
    """Stock tritonclient streams 16 greedy tokens over gRPC, in more than 5 responses, and
    their text is what ``/v1/completions`` answers the same request over HTTP."""
    import tritonclient.grpc as tc

    inputs = vllm_inputs("The sea is", sampling={"max_tokens": 16, "temperature": 0})
    results: queue.Queue[Any] = queue.Queue()
    text, responses = "", 0
    with tc.InferenceServerClient(grpc_target) as client:
        assert client.is_server_live() and client.is_model_ready(model)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, inputs, request_id="r")
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            text += result.as_numpy("text_output")[0].decode()
            responses += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    completion = httpx.post(
        url + "/v1/completions",
        json={"prompt": "The sea is", "max_tokens": 16, "temperature": 0},
        timeout=60,
    ).json()
    assert text == completion["choices"][0]["text"] and responses > 5
