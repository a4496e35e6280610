"""Every door returns a generation's permit exactly once, however the generation ends.

One test, parametrized over every door (each HTTP route kind, the resumable stream, both
WebSockets, both gRPC methods) and five endings, on a fake engine the test holds:

* ``end``: the answer runs to its end;
* ``error``: the engine fails after the first token (an in-band error, or an error answer);
* ``disconnect``: the client goes away mid-generation;
* ``cancel_before_first_step``: the task running the generation is cancelled before it ran
  a step, so no ``finally`` inside it ever runs;
* ``cancel_in_cleanup``: the client goes away, and while the engine is still cleaning up
  the aborted request (held by the test), the door's own task is cancelled too (Ray Serve
  cancels the replica's call after the app saw the disconnect).

After each: nothing in flight (the service's count and ``rillet_requests_in_flight``),
nothing running in the engine, the request counted once in ``rillet_requests_total``, and the
server still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException
from websockets.asyncio.client import connect

from app_server import Door, door
from polling import poll_until
from rillet.errors import GenerationError
from rillet.server.generation import Generation
from rillet.server.kserve.grpc_server import start_grpc_server
from triton_inputs import vllm_inputs

pytestmark = pytest.mark.timeout(30)

MODEL = "fake-model"
ENDINGS = ["end", "error", "disconnect", "cancel_before_first_step", "cancel_in_cleanup"]
TGI_BODY = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
MESSAGES = {"model": MODEL, **CHAT}
RESPONSE = {"model": MODEL, "input": "Hi", "max_output_tokens": 5}


@dataclass
class Doors:
    """The HTTP app and the gRPC door over one service and one fake engine."""

    http: Door
    grpc_target: str


#: A client's whole exchange with one door: what it saw (errors included, as text).
Talk = Callable[[Doors], Awaitable[str]]


def http_talk(path: str, body: dict[str, Any] | None, **headers: str) -> Talk:
    async def talk(doors: Doors) -> str:
        async with doors.http.http.stream("POST", path, json=body, headers=headers) as response:
            return (await response.aread()).decode()

    return talk


async def ws_chat(doors: Doors) -> str:
    async with connect(doors.http.url.replace("http", "ws", 1) + "/") as sock:
        await sock.send("Hi")
        seen = ""
        while (frame := await sock.recv()) != "<<Response Finished>>":
            seen += str(frame)
        return seen


async def ws_multiplexed(doors: Doors) -> str:
    async with connect(doors.http.url.replace("http", "ws", 1) + "/ws") as sock:
        await sock.send(json.dumps({"id": 1, "type": "generate", "prompt": "Hi", "max_tokens": 5}))
        seen = ""
        while True:
            frame = json.loads(await sock.recv())
            seen += json.dumps(frame)
            if frame["type"] in ("done", "error"):
                return seen


async def grpc_stream(doors: Doors) -> str:
    async with tc_aio.InferenceServerClient(doors.grpc_target) as client:
        sent = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            inputs = vllm_inputs("Hi", sampling={"max_tokens": 5})
            yield {"model_name": MODEL, "inputs": inputs, "request_id": "r"}
            await sent.wait()  # the call stays open until the answer is final

        seen = ""
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                sent.set()
                return seen + str(error)
            response = result.get_response()
            if response.outputs:
                seen += result.as_numpy("text_output")[0].decode()
            if response.parameters["triton_final_response"].bool_param:
                sent.set()
                return seen
        return seen


async def grpc_infer(doors: Doors) -> str:
    async with tc_aio.InferenceServerClient(doors.grpc_target) as client:
        inputs = vllm_inputs("Hi", stream=False, sampling={"max_tokens": 5})
        try:
            result = await client.infer(MODEL, inputs)
        except InferenceServerException as exc:
            return str(exc)
        return str(result.as_numpy("text_output")[0].decode())


#: door -> (its route label in the metrics, the client's exchange)
DOORS: dict[str, tuple[str, Talk]] = {
    "tgi_generate": ("generate", http_talk("/generate", TGI_BODY)),
    "tgi_stream": ("generate_stream", http_talk("/generate_stream", TGI_BODY)),
    "tgi_resumable": (
        "generate_stream",
        http_talk("/generate_stream", TGI_BODY, **{"x-rillet-resumable": "1"}),
    ),
    "openai_chat": ("chat_completions", http_talk("/v1/chat/completions", CHAT)),
    "openai_chat_stream": (
        "chat_completions",
        http_talk("/v1/chat/completions", {**CHAT, "stream": True}),
    ),
    "openai_completions_stream": (
        "completions",
        http_talk("/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stream": True}),
    ),
    "anthropic_messages": ("messages", http_talk("/v1/messages", MESSAGES)),
    "anthropic_messages_stream": (
        "messages",
        http_talk("/v1/messages", {**MESSAGES, "stream": True}),
    ),
    "responses": ("responses", http_talk("/v1/responses", RESPONSE)),
    "responses_stream": ("responses", http_talk("/v1/responses", {**RESPONSE, "stream": True})),
    "plain": ("plain", http_talk("/?prompt=Hi&max_new_tokens=5", None)),
    "triton_generate": (
        "triton_generate",
        http_talk(f"/v2/models/{MODEL}/generate", {"text_input": "Hi", "max_tokens": 5}),
    ),
    "triton_stream": (
        "triton_generate_stream",
        http_talk(f"/v2/models/{MODEL}/generate_stream", {"text_input": "Hi", "max_tokens": 5}),
    ),
    "ws_chat": ("ws_chat", ws_chat),
    "ws": ("ws", ws_multiplexed),
    "grpc_stream": ("grpc_stream", grpc_stream),
    "grpc_infer": ("grpc_infer", grpc_infer),
}


@contextlib.asynccontextmanager
async def doors(**config: Any) -> AsyncIterator[Doors]:
    async with door(**config) as http:
        server, port = await start_grpc_server(http.service, "127.0.0.1", 0)
        try:
            yield Doors(http, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=None)


def watch_runs(monkeypatch: pytest.MonkeyPatch, cancel_at_once: bool) -> list[asyncio.Task[Any]]:
    """Record the task each door calls ``Generation.run`` from (the door's own task);
    with ``cancel_at_once``, cancel the first run's task before it can run a step."""
    callers: list[asyncio.Task[Any]] = []
    real_run = Generation.run

    def run(self: Generation, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        caller = asyncio.current_task()
        assert caller is not None
        callers.append(caller)
        task = real_run(self, work)
        if cancel_at_once and len(callers) == 1:
            task.cancel()
        return task

    monkeypatch.setattr(Generation, "run", run)
    return callers


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("name", list(DOORS))
async def test_every_door_returns_the_permit_once_however_the_generation_ends(
    name: str, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    route, talk = DOORS[name]
    callers = watch_runs(monkeypatch, cancel_at_once=ending == "cancel_before_first_step")
    # A resumable stream outlives its client for the resume window: a short one, so that a
    # stream nobody resumes is aborted as every other door's is when its client leaves.
    async with doors(resume_window_s=0.01) as ds:
        engine, service = ds.http.engine, ds.http.service
        if ending == "error":
            engine.fail_after = (1, GenerationError("boom"))
        if ending in ("disconnect", "cancel_in_cleanup"):
            engine.pause()
        if ending == "cancel_in_cleanup":
            engine.hold_aborts = asyncio.Event()
        client = asyncio.ensure_future(talk(ds))

        if ending in ("end", "error"):
            seen = await client
            if ending == "end":
                assert seen
            elif name == "plain":
                assert seen == "H"  # plain text has no in-band error: the text stops
            else:
                assert "boom" in seen
        elif ending == "cancel_before_first_step":
            await poll_until(lambda: callers and service.in_flight == 0)
            assert engine.requests == []  # the engine never saw it
        else:
            await engine.wait_running(1)
            client.cancel()  # the client goes away
            if ending == "cancel_in_cleanup":
                await engine.aborting.wait()
                for caller in callers:
                    caller.cancel()  # a second cancel, while the abort is still under way
                engine.hold_aborts.set()  # type: ignore[union-attr]
            await poll_until(lambda: len(engine.aborted) == 1)
        if not client.done():
            client.cancel()
        await asyncio.wait({client})

        await poll_until(lambda: service.in_flight == 0 and not engine.running)
        if ending == "end":
            assert len(engine.finished) == 1 and not engine.aborted
        registry = service.metrics.registry
        service.render_metrics()  # sets the gauge, as a scrape does
        assert registry.get_sample_value("rillet_requests_in_flight") == 0
        counted = [
            registry.get_sample_value("rillet_requests_total", {"route": route, "outcome": o})
            for o in ("success", "generation", "cancelled")
        ]
        assert sum(c or 0 for c in counted) == 1, counted
        assert len(callers) == 1
        engine.fail_after = None
        engine.resume()
        answer = await ds.http.http.post("/generate", json=TGI_BODY)
        assert answer.status_code == 200 and answer.json()["generated_text"] == "Hello"
