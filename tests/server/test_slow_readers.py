"""Stalled readers on every streaming door, over the real ``AsyncEngine`` (its collectors)
and a core the test steps (``stepped_engine.py``): the engine never waits for a reader.

Where a stalled reader's output sits, door by door, before the collector holds any:

* TGI / OpenAI / Anthropic / Responses / Triton HTTP (SSE), plain text (chunked): the
  client's socket buffer, the server's socket send
  buffer, then the transport's write buffer (uvicorn pauses the response's writer past its
  high-water mark), so the stream's producer stops taking outputs: they merge in the
  collector.
* ``/ws``: the same socket buffers and the websocket's send (it waits on the transport's
  drain), after the client's own queue of received frames is full.
* gRPC: HTTP/2 flow control (the stream's and the connection's windows), then the
  servicer's queue of 64 responses; its writer then waits, and outputs merge.

Then the collector holds them, merged, up to ``--max-stream-buffer-bytes``: (a) a reader
that comes back gets every token; (b) past the bound the request is aborted in the engine
and the reader gets one in-band error in its door's shape (``incomplete_generation``;
Anthropic's ``api_error``; Responses' ``error`` + ``response.failed``; Triton HTTP's
``{"error": message}``), and its permit is back. Plain text cannot say "error" mid-stream:
it ends, short.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tritonclient.grpc.aio as tc_aio
from websockets.asyncio.client import connect

from app_server import serving
from polling import poll_until
from rillet.engine.async_engine import AsyncEngine
from rillet.server.config import ServerConfig
from rillet.server.http.app import create_app
from rillet.server.service import GenerationService
from sse_text import data_events, named_events
from stepped_engine import STALLED_BYTES, SteppedBackend, stall, stepped_engine
from triton_inputs import vllm_inputs

pytestmark = pytest.mark.timeout(60)

#: A reader's small receive buffer, so a stall reaches the server quickly.
SMALL_RCVBUF = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
#: A bound a stalled stream passes within a few dozen tokens.
SMALL_BOUND = 2048
TGI = {"inputs": "Hi", "parameters": {"max_new_tokens": 1 << 19}}


@contextlib.asynccontextmanager
async def http_door(
    **config: Any,
) -> AsyncIterator[tuple[AsyncEngine, SteppedBackend, GenerationService, httpx.AsyncClient]]:
    engine, backend = stepped_engine()
    app = create_app(engine, ServerConfig(**config), owns_engine=False)
    transport = httpx.AsyncHTTPTransport(socket_options=SMALL_RCVBUF)
    async with (
        serving(app, send_buffer=4096) as url,
        httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as http,
    ):
        yield engine, backend, app.state.rillet, http


async def test_tgi_a_stalled_reader_gets_every_token_when_it_reads_again() -> None:
    async with http_door() as (engine, backend, service, http):
        async with http.stream("POST", "/generate_stream", json=TGI) as response:
            rid = await stall(engine, backend)  # the reader reads nothing meanwhile
            for _ in range(500):  # and the engine goes on, never waiting for it
                backend.step()
            backend.step(finish=True)
            await poll_until(lambda: engine.buffered_bytes(rid) > STALLED_BYTES + 500 * 65)
            made = backend.num_steps
            body = (await response.aread()).decode()
        got = data_events(body)
        assert len(got) == made and [e["index"] for e in got] == list(range(1, made + 1))
        assert got[-1]["generated_text"] == "x" * made
        assert backend.aborted == [] and service.in_flight == 0


async def test_tgi_a_stream_past_the_bound_ends_with_one_error_and_frees_its_permit() -> None:
    async with http_door(max_stream_buffer_bytes=SMALL_BOUND) as (engine, backend, service, http):
        async with http.stream("POST", "/generate_stream", json=TGI) as response:
            rid = await stall(engine, backend)
            assert backend.aborted == [rid]  # at once, while the reader still stalls
            body = (await response.aread()).decode()
        *tokens, error = data_events(body)
        assert all("token" in e for e in tokens) and len(tokens) < backend.num_steps
        assert error["error_type"] == "incomplete_generation"
        assert "--max-stream-buffer-bytes" in error["error"]
        await poll_until(lambda: service.in_flight == 0)
        outcome = {"route": "generate_stream", "outcome": "incomplete_generation"}
        assert service.metrics.registry.get_sample_value("rillet_requests_total", outcome) == 1


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1 << 19, "stream": True}


@pytest.mark.parametrize("bound", [None, SMALL_BOUND], ids=["every-token", "past-the-bound"])
async def test_openai_a_stalled_reader(bound: int | None) -> None:
    config = {} if bound is None else {"max_stream_buffer_bytes": bound}
    async with http_door(**config) as (engine, backend, service, http):
        async with http.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            rid = await stall(engine, backend)
            if bound is None:
                backend.step(finish=True)
            body = (await response.aread()).decode()
        await poll_until(lambda: service.in_flight == 0)
    assert body.endswith("data: [DONE]\n\n")
    chunks = data_events(body)
    if bound is None:
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == "x" * backend.num_steps and backend.aborted == []
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        assert backend.aborted == [rid]
        assert [c for c in chunks if "error" in c] == [chunks[-1]]
        assert chunks[-1]["error"]["type"] == "incomplete_generation"


@pytest.mark.parametrize("bound", [None, SMALL_BOUND], ids=["every-token", "past-the-bound"])
async def test_ws_a_stalled_reader(bound: int | None) -> None:
    config = {} if bound is None else {"max_stream_buffer_bytes": bound}
    async with http_door(**config) as (engine, backend, service, http):
        host, port = str(http.base_url.host), int(http.base_url.port or 0)
        sock = socket.socket()
        sock.setsockopt(*SMALL_RCVBUF[0])
        sock.connect((host, port))
        sock.setblocking(False)
        url = f"ws://{host}:{port}/ws"
        # max_queue=1: the client stops reading its socket while a frame waits for recv()
        async with connect(url, sock=sock, max_queue=1) as ws:
            generate = {"type": "generate", "id": 1, "prompt": "Hi", "max_tokens": 1 << 19}
            await ws.send(json.dumps(generate))
            rid = await stall(engine, backend)
            if bound is None:
                backend.step(finish=True)
            frames = [json.loads(await ws.recv())]
            while frames[-1]["type"] == "token":
                frames.append(json.loads(await ws.recv()))
        await poll_until(lambda: service.in_flight == 0)
    *tokens, last = frames
    if bound is None:
        assert "".join(f["text"] for f in tokens) == "x" * backend.num_steps
        assert last["type"] == "done" and last["usage"]["completion_tokens"] == backend.num_steps
        assert backend.aborted == []
    else:
        assert backend.aborted == [rid]
        assert last["type"] == "error" and last["error_type"] == "incomplete_generation"


@pytest.mark.parametrize("bound", [None, SMALL_BOUND], ids=["every-token", "past-the-bound"])
async def test_grpc_a_stalled_reader(bound: int | None) -> None:
    from rillet.server.kserve.grpc_server import start_grpc_server

    engine, backend = stepped_engine()
    config = ServerConfig() if bound is None else ServerConfig(max_stream_buffer_bytes=bound)
    service = GenerationService(engine, config)
    server, port = await start_grpc_server(service, "127.0.0.1", 0)
    # No BDP probing: the client's flow-control window stays at its initial 64 KiB.
    options = [("grpc.http2.bdp_probe", 0)]
    try:
        async with tc_aio.InferenceServerClient(
            f"127.0.0.1:{port}", channel_args=options
        ) as client:

            async def requests() -> AsyncIterator[dict[str, Any]]:
                sampling = {"max_tokens": 1 << 19}
                yield {"model_name": "fake-model", "inputs": vllm_inputs("Hi", sampling=sampling)}

            responses = client.stream_infer(requests())
            rid = await stall(engine, backend)  # nothing read from ``responses`` meanwhile
            if bound is None:
                backend.step(finish=True)
            text, error = "", None
            async for result, error in responses:
                if error is not None:
                    break
                text += result.as_numpy("text_output")[0].decode()
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            await poll_until(lambda: service.in_flight == 0)
    finally:
        await server.stop(grace=None)
    if bound is None:
        assert error is None and text == "x" * backend.num_steps and backend.aborted == []
    else:
        assert backend.aborted == [rid]
        assert error is not None and "incomplete_generation" in str(error)


def anthropic_outcome(body: str) -> tuple[str, str | None, int | None]:
    """(text, the in-band error's type, the usage's output tokens) of a Messages stream."""
    got = named_events(body)
    text = "".join(e["delta"].get("text", "") for n, e in got if n == "content_block_delta")
    errors = [e["error"]["type"] for n, e in got if n == "error"]
    usage = [e["usage"]["output_tokens"] for n, e in got if n == "message_delta"]
    assert len(errors) <= 1 and (not errors or got[-1][0] == "error")
    return text, errors[0] if errors else None, usage[0] if usage else None


def responses_outcome(body: str) -> tuple[str, str | None, int | None]:
    """The same of a Responses stream (its error event is ``response.failed``)."""
    got = named_events(body)
    text = "".join(e["delta"] for n, e in got if n == "response.output_text.delta")
    failed = [e["response"]["error"]["code"] for n, e in got if n == "response.failed"]
    ends = [e["response"]["usage"] for n, e in got if n == "response.incomplete"]
    assert len(failed) <= 1 and (not failed or got[-1][0] == "response.failed")
    return text, failed[0] if failed else None, ends[0]["output_tokens"] if ends else None


def triton_outcome(body: str) -> tuple[str, str | None, int | None]:
    """Triton HTTP's events: text pieces, or ``{"error": message}`` (no type: the message)."""
    got = data_events(body)
    errors = [e["error"] for e in got if "error" in e]
    assert len(errors) <= 1 and (not errors or "error" in got[-1])
    text = "".join(e.get("text_output", "") for e in got if "error" not in e)
    return text, errors[0] if errors else None, None


MESSAGES = {
    "model": "m",
    "max_tokens": 1 << 19,
    "messages": [{"role": "user", "content": "Hi"}],
    "stream": True,
}
RESPONSES = {"model": "m", "input": "Hi", "max_output_tokens": 1 << 19, "stream": True}
TRITON = {"text_input": "Hi", "stream": True, "parameters": {"max_tokens": 1 << 19}}
#: route, body, what the body says, and its in-band error past the bound
SSE_DOORS = {
    # Anthropic has no type for an incomplete generation: its catch-all, as a 500 would be.
    "anthropic": ("/v1/messages", MESSAGES, anthropic_outcome, "api_error"),
    "responses": ("/v1/responses", RESPONSES, responses_outcome, "incomplete_generation"),
    "triton-http": (
        "/v2/models/fake-model/generate_stream",
        TRITON,
        triton_outcome,
        "the client read too slowly: more than 2048 bytes of output were waiting for it "
        "(--max-stream-buffer-bytes)",
    ),
}


@pytest.mark.parametrize("bound", [None, SMALL_BOUND], ids=["every-token", "past-the-bound"])
@pytest.mark.parametrize("name", SSE_DOORS)
async def test_named_event_and_triton_doors_a_stalled_reader(name: str, bound: int | None) -> None:
    """Anthropic, Responses and Triton HTTP: every token after a stall, or one in-band
    error of the door's own kind past the bound."""
    route, body, outcome, bound_error = SSE_DOORS[name]
    config = {} if bound is None else {"max_stream_buffer_bytes": bound}
    async with http_door(**config) as (engine, backend, service, http):
        async with http.stream("POST", route, json=body) as response:
            rid = await stall(engine, backend)
            if bound is None:
                backend.step(finish=True)
            raw = (await response.aread()).decode()
        await poll_until(lambda: service.in_flight == 0)
    text, error, usage = outcome(raw)
    if bound is None:
        assert text == "x" * backend.num_steps and error is None and backend.aborted == []
        assert usage in (None, backend.num_steps)
    else:
        assert backend.aborted == [rid] and len(text) < backend.num_steps
        assert error == bound_error


@pytest.mark.parametrize("bound", [None, SMALL_BOUND], ids=["every-token", "past-the-bound"])
async def test_plain_a_stalled_reader(bound: int | None) -> None:
    """Plain text has no way to say "error" mid-stream: past the bound it just ends, short,
    and the request is aborted at once; otherwise every token comes."""
    config = {} if bound is None else {"max_stream_buffer_bytes": bound}
    async with http_door(**config) as (engine, backend, service, http):
        query = {"prompt": "Hi", "max_new_tokens": str(1 << 19)}
        async with http.stream("POST", "/", params=query) as response:
            rid = await stall(engine, backend)
            if bound is None:
                backend.step(finish=True)
            text = (await response.aread()).decode()
        await poll_until(lambda: service.in_flight == 0)
    if bound is None:
        assert text == "x" * backend.num_steps and backend.aborted == []
    else:
        assert backend.aborted == [rid] and text == "x" * len(text)
        assert len(text) < backend.num_steps
