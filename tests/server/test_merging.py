"""Fewer events under load (``engine/pacing.py``) on every door, over the real ``AsyncEngine``
and a core the test steps (``stepped_engine.py``), with readers that keep up.

The pacer is told to hold one step per live stream (``streams_per_event_step = 1``), and two
streams run together, so each holds its tokens for 2 steps: after its first token (at once),
an event every second step, and its end at once. After each step the test waits until the
engine side has settled (every output either taken by its door or held by the pacer) and
the readers have all the doors sent, then checks each reader against the schedule: a door
that sends tokens early or late fails at that step.
On each door the events' token counts (``rillet_timing.tokens``, where the door has it) add
up to the usage and the text is every token's, as without merging. TGI's
``/generate_stream`` does not merge: one event per token, each at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import tritonclient.grpc.aio as tc_aio
from websockets.asyncio.client import connect

from app_server import serving
from polling import poll_until
from rillet.engine.async_engine import AsyncEngine
from rillet.engine.collector import TOKEN_BYTES
from rillet.server.config import ServerConfig
from rillet.server.http.app import create_app
from rillet.server.timing import TIMING_KEY
from stepped_engine import SteppedBackend, stepped_engine
from triton_inputs import vllm_inputs

pytestmark = pytest.mark.timeout(60)

#: Tokens per stream: the first, then five events of two (the last with the end).
NUM_TOKENS = 11
NUM_STREAMS = 2
TIMED = {"x-rillet-timing": "1"}


@dataclass
class Received:
    """What one reader has had so far: the token count of each event that delivers any,
    and all the text (some doors send a merged output's text in an event of its own)."""

    events: list[int] = field(default_factory=list)
    text: str = ""
    usage: int | None = None

    def add(self, tokens: int, text: str) -> None:
        self.text += text
        if tokens:
            self.events.append(tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.events)


def expected_tokens(step: int, hold: int) -> int:
    """The tokens a reader has once ``step`` steps ran: the first at once, then each
    ``hold``-th step's, and everything at the end."""
    if step >= NUM_TOKENS:
        return NUM_TOKENS
    return 1 + hold * ((step - 1) // hold)


async def sse_blocks(response: httpx.Response) -> AsyncIterator[str]:
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        *blocks, buffer = buffer.split("\n\n")
        for block in blocks:
            yield block


def block_data(block: str) -> dict[str, Any] | None:
    for line in block.split("\n"):
        if line.startswith("data: {"):
            data: dict[str, Any] = json.loads(line.removeprefix("data: "))
            return data
    return None


Reader = Callable[[httpx.AsyncClient, Received], Awaitable[None]]


async def read_openai_chat(http: httpx.AsyncClient, got: Received) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": NUM_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=TIMED) as r:
        async for block in sse_blocks(r):
            chunk = block_data(block)
            if chunk is None:
                continue
            if chunk.get("usage"):
                got.usage = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                text = chunk["choices"][0]["delta"].get("content") or ""
                got.add(chunk[TIMING_KEY]["tokens"], text)


async def read_completions(http: httpx.AsyncClient, got: Received) -> None:
    body = {"prompt": "Hi", "max_tokens": NUM_TOKENS, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body, headers=TIMED) as r:
        async for block in sse_blocks(r):
            chunk = block_data(block)
            if chunk is not None and chunk["choices"]:
                got.add(chunk[TIMING_KEY]["tokens"], chunk["choices"][0]["text"])


async def read_anthropic(http: httpx.AsyncClient, got: Received) -> None:
    body = {
        "model": "m",
        "max_tokens": NUM_TOKENS,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
    }
    async with http.stream("POST", "/v1/messages", json=body, headers=TIMED) as r:
        async for block in sse_blocks(r):
            event = block_data(block)
            if event is None:
                continue
            if event["type"] == "message_delta":
                got.usage = event["usage"]["output_tokens"]
            got.add(event[TIMING_KEY]["tokens"], event.get("delta", {}).get("text", ""))


async def read_responses(http: httpx.AsyncClient, got: Received) -> None:
    body = {"model": "m", "input": "Hi", "stream": True, "max_output_tokens": NUM_TOKENS}
    async with http.stream("POST", "/v1/responses", json=body, headers=TIMED) as r:
        async for block in sse_blocks(r):
            event = block_data(block)
            if event is None:
                continue
            if event["type"] in ("response.completed", "response.incomplete"):
                got.usage = event["response"]["usage"]["output_tokens"]
            delta = event["delta"] if event["type"] == "response.output_text.delta" else ""
            got.add(event[TIMING_KEY]["tokens"], delta)


async def read_plain(http: httpx.AsyncClient, got: Received) -> None:
    """Plain text has no timing: each piece of text read counts its characters (one token
    each here); the schedule still holds, since the test waits for the reader at each step."""
    query = {"prompt": "Hi", "max_new_tokens": str(NUM_TOKENS)}
    async with http.stream("POST", "/", params=query) as r:
        async for text in r.aiter_text():
            got.add(len(text), text)


async def read_tgi(http: httpx.AsyncClient, got: Received) -> None:
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": NUM_TOKENS}}
    async with http.stream("POST", "/generate_stream", json=body, headers=TIMED) as r:
        async for block in sse_blocks(r):
            event = block_data(block)
            if event is not None:
                got.add(event[TIMING_KEY]["tokens"], event["token"]["text"])


#: What one pending "x" token counts for in ``buffered_bytes``: its byte and TOKEN_BYTES.
TOKEN_COST = 1 + TOKEN_BYTES


async def step_and_check(
    engine: AsyncEngine,
    backend: SteppedBackend,
    received: list[Received],
    step: int,
    hold: int,
    tasks: list[asyncio.Future[None]],
) -> None:
    """One engine step; then wait until nothing is due on the engine side (each request's
    output taken by its door, or held by the pacer) and the readers have every token the
    doors took, and check each reader has what the schedule says."""
    rids = list(backend.running)
    backend.step()

    def settled() -> bool:
        if any_done(tasks):
            return True
        if any(engine.buffered_bytes(rid) and not engine.is_held(rid) for rid in rids):
            return False  # due, not yet taken by its door
        held = sum(engine.buffered_bytes(rid) for rid in rids) // TOKEN_COST
        return sum(got.num_tokens for got in received) + held == step * len(received)

    await poll_until(settled)
    want = expected_tokens(step, hold)
    assert [got.num_tokens for got in received] == [want] * len(received), step


async def run_streams(
    engine: AsyncEngine,
    backend: SteppedBackend,
    readers: list[Callable[[Received], Awaitable[None]]],
    hold: int,
) -> list[Received]:
    """Start the readers, step the engine to the end, and check each reader's progress
    against the schedule after every step; returns what each received."""
    received = [Received() for _ in readers]
    tasks = [asyncio.ensure_future(read(got)) for read, got in zip(readers, received, strict=True)]
    try:
        await poll_until(lambda: len(backend.running) == len(readers) or any_done(tasks))
        for step in range(1, NUM_TOKENS + 1):
            await step_and_check(engine, backend, received, step, hold, tasks)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return received


def any_done(tasks: list[asyncio.Future[None]]) -> bool:
    """A reader that ended early (its error) ends the wait, and the test, at once."""
    for task in tasks:
        if task.done():
            task.result()
    return False


@contextlib.asynccontextmanager
async def merging_http(
    max_merge_steps: int = 4,
) -> AsyncIterator[tuple[AsyncEngine, SteppedBackend, httpx.AsyncClient]]:
    engine, backend = stepped_engine()
    engine.pacer.streams_per_event_step = 1  # two live streams: hold two steps
    config = ServerConfig(max_merge_steps=max_merge_steps)
    app = create_app(engine, config, owns_engine=False)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield engine, backend, http


def merged_events() -> list[int]:
    return [1] + [2] * ((NUM_TOKENS - 1) // 2)


DOORS: dict[str, Reader] = {
    "openai-chat": read_openai_chat,
    "openai-completions": read_completions,
    "anthropic": read_anthropic,
    "responses": read_responses,
    "plain": read_plain,
}


@pytest.mark.parametrize("reader", DOORS.values(), ids=DOORS.keys())
async def test_under_load_a_door_sends_two_steps_per_event(reader: Reader) -> None:
    async with merging_http() as (engine, backend, http):
        received = await run_streams(
            engine, backend, [lambda got: reader(http, got) for _ in range(NUM_STREAMS)], hold=2
        )
    for got in received:
        assert got.events == merged_events()
        assert got.text == "x" * NUM_TOKENS
        assert got.usage in (None, NUM_TOKENS)


async def test_a_stream_capped_at_one_step_is_never_held() -> None:
    async with merging_http(max_merge_steps=1) as (engine, backend, http):
        received = await run_streams(
            engine,
            backend,
            [lambda got: read_openai_chat(http, got) for _ in range(NUM_STREAMS)],
            hold=1,
        )
    for got in received:
        assert got.events == [1] * NUM_TOKENS


async def test_tgi_stream_keeps_one_event_per_token_each_at_once_under_load() -> None:
    async with merging_http() as (engine, backend, http):
        received = await run_streams(
            engine, backend, [lambda got: read_tgi(http, got) for _ in range(NUM_STREAMS)], hold=1
        )
    for got in received:
        assert got.events == [1] * NUM_TOKENS and got.text == "x" * NUM_TOKENS


async def test_ws_frames_merge_under_load() -> None:
    async with merging_http() as (engine, backend, http):
        url = str(http.base_url).replace("http://", "ws://").rstrip("/") + "/ws"
        async with connect(url) as sock:
            received = [Received() for _ in range(NUM_STREAMS)]

            async def read_all() -> None:
                done = 0
                while done < NUM_STREAMS:
                    frame = json.loads(await sock.recv())
                    got = received[frame["id"]]
                    if frame["type"] == "done":
                        got.usage = frame["usage"]["completion_tokens"]
                        done += 1
                    got.add(frame[TIMING_KEY]["tokens"], frame.get("text", ""))

            reading = asyncio.ensure_future(read_all())
            for i in range(NUM_STREAMS):
                generate = {"type": "generate", "id": i, "prompt": "Hi", "timing": True}
                await sock.send(json.dumps(generate | {"max_tokens": NUM_TOKENS}))
            await poll_until(lambda: len(backend.running) == NUM_STREAMS)
            for step in range(1, NUM_TOKENS + 1):
                await step_and_check(engine, backend, received, step, 2, [reading])
            await reading
    for got in received:
        assert got.events == merged_events()
        assert got.text == "x" * NUM_TOKENS
        assert got.usage == NUM_TOKENS


async def test_grpc_responses_merge_under_load() -> None:
    from rillet.server.kserve.grpc_server import start_grpc_server
    from rillet.server.service import GenerationService

    engine, backend = stepped_engine()
    engine.pacer.streams_per_event_step = 1
    service = GenerationService(engine, ServerConfig())
    server, port = await start_grpc_server(service, "127.0.0.1", 0)
    try:
        async with tc_aio.InferenceServerClient(f"127.0.0.1:{port}") as client:

            async def read(got: Received) -> None:
                async def requests() -> AsyncIterator[dict[str, Any]]:
                    yield {
                        "model_name": "fake-model",
                        "inputs": vllm_inputs("Hi", sampling={"max_tokens": NUM_TOKENS}),
                        "parameters": {"timing": True},
                    }

                async for result, error in client.stream_infer(requests()):
                    assert error is None
                    response = result.get_response()
                    tokens = json.loads(response.parameters[TIMING_KEY].string_param)["tokens"]
                    got.add(tokens, result.as_numpy("text_output")[0].decode())
                    if response.parameters["triton_final_response"].bool_param:
                        break

            received = await run_streams(engine, backend, [read] * NUM_STREAMS, hold=2)
    finally:
        await server.stop(grace=None)
    for got in received:
        assert got.events == merged_events()
        assert got.text == "x" * NUM_TOKENS
