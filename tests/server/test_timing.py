"""Per-event server timing (``X-Rillet-Timing: 1``, ``timing`` on /ws and gRPC) on every
streaming door, on the fake engine (one step per output, its first held in the queue while
the test waits, so ``queued_s`` is at least that wait).

On each door: ``emitted_at`` never decreases, ``step`` never decreases and rises with every
event that delivers tokens, the ``tokens`` add up to the usage, and the final event's
``queued_s + prefill_s`` is its ``ttft_s`` up to the server's own delivery time (the fake
engine's steps take no time, so that is well under a step). Without the flag not a byte
changes: the events are exactly the timed ones without ``rillet_timing``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tritonclient.grpc.aio as tc_aio
from websockets.asyncio.client import connect

from app_server import Door, door, grpc_door
from fake_engine import FakeEngine
from polling import poll_until
from rillet.protocol import GeneratedToken, RequestOutput
from rillet.server.timing import TIMING_KEY, StreamTiming
from sse_text import data_events, named_events
from triton_inputs import vllm_inputs

pytestmark = pytest.mark.timeout(30)

TIMED = {"x-rillet-timing": "1"}
TGI = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
CHAT = {
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 5,
    "stream": True,
    "stream_options": {"include_usage": True},
}
#: How long the first output is held in the fake engine's queue.
HOLD_S = 0.05


def check(timings: list[dict[str, Any]], num_generated: int) -> None:
    """The invariants of one stream's ``rillet_timing`` objects, in order."""
    emitted = [t["emitted_at"] for t in timings]
    assert emitted == sorted(emitted)
    steps = [t["step"] for t in timings]
    assert steps == sorted(steps)
    token_steps = [t["step"] for t in timings if t["tokens"]]
    assert len(set(token_steps)) == len(token_steps), "each token comes from its own step"
    assert sum(t["tokens"] for t in timings) == num_generated
    *body, final = timings
    assert all("ttft_s" not in t for t in body)
    assert final["queued_s"] >= HOLD_S
    assert final["prefill_s"] >= 0 and final["ttft_s"] >= HOLD_S
    delivery = final["ttft_s"] - (final["queued_s"] + final["prefill_s"])
    assert -1e-5 <= delivery < 0.05  # rounded to microseconds; the fake's steps take none
    assert final["decode_tokens_per_s"] is None or final["decode_tokens_per_s"] > 0


async def held_first(d: Door, send: Any) -> Any:
    """Run ``send()`` with the request held in the queue for HOLD_S before its first token."""
    return await hold_first(d.engine, asyncio.ensure_future(send()))


async def hold_first(engine: FakeEngine, task: asyncio.Future[Any]) -> Any:
    """Hold the request ``task`` sends in the engine's queue for HOLD_S, then its result."""
    engine.pause(before_first=True)
    await poll_until(lambda: bool(engine.running) or task.done())
    await asyncio.sleep(HOLD_S)
    engine.resume()
    return await task


def without_timing(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in o.items() if k != TIMING_KEY} for o in objects]


def drop_clock_fields(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's ``created`` and ids differ between two requests; nothing else may."""
    return [{k: v for k, v in o.items() if k not in ("id", "created")} for o in objects]


async def test_tgi_events_carry_timing_only_when_asked() -> None:
    async with door() as d:
        plain = await d.http.post("/generate_stream", json=TGI)
        assert b"rillet_timing" not in plain.content

        async def send() -> Any:
            return await d.http.post("/generate_stream", json=TGI, headers=TIMED)

        timed = data_events((await held_first(d, send)).text)
        assert [e[TIMING_KEY]["tokens"] for e in timed] == [1] * 5  # one token per event
        check([e[TIMING_KEY] for e in timed], 5)
        assert without_timing(timed) == data_events(plain.text)
        assert list(timed[0])[-1] == TIMING_KEY  # after every TGI field


async def test_openai_chunks_carry_timing_only_when_asked() -> None:
    async with door() as d:
        plain = await d.http.post("/v1/chat/completions", json=CHAT)
        assert b"rillet_timing" not in plain.content

        async def send() -> Any:
            return await d.http.post("/v1/chat/completions", json=CHAT, headers=TIMED)

        timed = data_events((await held_first(d, send)).text)
        *chunks, usage = timed
        assert usage["choices"] == [] and usage[TIMING_KEY]["tokens"] == 0
        assert chunks[0][TIMING_KEY]["tokens"] == 0  # the role chunk
        finish = chunks[-1]
        assert finish["choices"][0]["finish_reason"] == "length"
        check([c[TIMING_KEY] for c in chunks], usage["usage"]["completion_tokens"])
        check_emitted = [t[TIMING_KEY]["emitted_at"] for t in timed]
        assert check_emitted == sorted(check_emitted)
        assert drop_clock_fields(without_timing(timed)) == drop_clock_fields(
            data_events(plain.text)
        )


async def test_triton_http_events_carry_timing() -> None:
    async with door() as d:
        route = "/v2/models/fake-model/generate_stream"
        body = {"text_input": "Hi", "stream": True, "parameters": {"max_tokens": 4}}

        async def send() -> Any:
            return await d.http.post(route, json=body, headers=TIMED)

        timed = data_events((await held_first(d, send)).text)
        check([e[TIMING_KEY] for e in timed], 4)
        plain = data_events((await d.http.post(route, json=body)).text)
        assert without_timing(timed) == plain


def without_ids(value: Any) -> Any:
    """Ids and clocks differ between two requests; nothing else may."""
    if isinstance(value, dict):
        skip = ("id", "item_id", "call_id", "created_at", TIMING_KEY)
        return {k: without_ids(v) for k, v in value.items() if k not in skip}
    if isinstance(value, list | tuple):
        return [without_ids(v) for v in value]
    return value


TOOL_CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'


async def test_anthropic_events_carry_timing_only_when_asked() -> None:
    async with door(max_model_len=4096) as d:
        d.engine.reply = "Hi" + TOOL_CALL
        tool = {"name": "f", "input_schema": {"type": "object"}}
        body = {
            "model": "m",
            "max_tokens": 200,
            "messages": CHAT["messages"],
            "stream": True,
            "tools": [tool],
        }
        plain = await d.http.post("/v1/messages", json=body)
        assert b"rillet_timing" not in plain.content

        async def send() -> Any:
            return await d.http.post("/v1/messages", json=body, headers=TIMED)

        timed = named_events((await held_first(d, send)).text)
        names = [name for name, _ in timed]
        assert "content_block_start" in names and names[-2:] == ["message_delta", "message_stop"]
        assert all(TIMING_KEY in event for _, event in timed)
        assert timed[0][1][TIMING_KEY]["tokens"] == 0  # message_start
        *through_delta, stop = [event[TIMING_KEY] for _, event in timed]
        assert stop["tokens"] == 0 and "ttft_s" not in stop
        check(through_delta, len(d.engine.reply))
        assert timed[-2][1]["delta"]["stop_reason"] == "tool_use"
        assert without_ids(timed) == without_ids(named_events(plain.text))


async def test_responses_events_carry_timing_only_when_asked() -> None:
    async with door(max_model_len=4096) as d:
        d.engine.reply = "Hi" + TOOL_CALL
        tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
        body = {"model": "m", "input": "Hi", "stream": True, "tools": [tool]}
        plain = await d.http.post("/v1/responses", json=body)
        assert b"rillet_timing" not in plain.content

        async def send() -> Any:
            return await d.http.post("/v1/responses", json=body, headers=TIMED)

        timed = named_events((await held_first(d, send)).text)
        assert timed[-1][0] == "response.completed"
        assert [e[TIMING_KEY]["tokens"] for _, e in timed[:2]] == [0, 0]  # created, in_progress
        check([e[TIMING_KEY] for _, e in timed], len(d.engine.reply))
        kinds = {name for name, _ in timed}
        assert "response.function_call_arguments.delta" in kinds
        assert without_ids(timed) == without_ids(named_events(plain.text))


async def test_ws_token_and_done_frames_carry_timing() -> None:
    async with door() as d:
        url = d.url.replace("http://", "ws://") + "/ws"
        async with connect(url) as sock:

            async def run(frame: dict[str, Any]) -> list[dict[str, Any]]:
                await sock.send(json.dumps(frame))
                frames = []
                while not frames or frames[-1]["type"] != "done":
                    frames.append(json.loads(await sock.recv()))
                return frames

            generate = {"type": "generate", "id": 1, "prompt": "Hi", "max_tokens": 5}
            plain = await run(generate)
            timed = await held_first(d, lambda: run(generate | {"timing": True}))
        assert all(TIMING_KEY not in f for f in plain)
        check([f[TIMING_KEY] for f in timed], timed[-1]["usage"]["completion_tokens"])
        assert without_timing(timed) == plain


async def test_grpc_responses_carry_timing_as_a_parameter() -> None:
    async with grpc_door() as d, tc_aio.InferenceServerClient(d.target) as client:

        async def run(parameters: dict[str, Any]) -> list[Any]:
            async def requests() -> AsyncIterator[dict[str, Any]]:
                yield {
                    "model_name": "fake-model",
                    "inputs": vllm_inputs("Hi", sampling={"max_tokens": 4}),
                    "parameters": parameters,
                }

            responses = []
            async for result, error in client.stream_infer(requests()):
                assert error is None
                response = result.get_response()
                responses.append(response)
                if response.parameters["triton_final_response"].bool_param:
                    break
            return responses

        plain = await run({})
        assert all(TIMING_KEY not in r.parameters for r in plain)
        timed = await hold_first(d.engine, asyncio.ensure_future(run({"timing": True})))
    check([json.loads(r.parameters[TIMING_KEY].string_param) for r in timed], 4)
    for r in timed:
        del r.parameters[TIMING_KEY]
    assert [r.SerializeToString(deterministic=True) for r in timed] == [
        r.SerializeToString(deterministic=True) for r in plain
    ]


def output(step: int, generated: int, text: str = "a") -> RequestOutput:
    tokens = [GeneratedToken(1, text, None, False)] if text else []
    return RequestOutput("r", tokens, text, num_generated_tokens=generated, step=step)


def test_a_merged_output_carries_its_latest_step_and_first_times() -> None:
    merged = output(3, 1)
    merged.first_token_time = merged.first_scheduled_time = 1.0
    merged.merge(output(4, 2))
    assert merged.step == 4 and merged.first_token_time == 1.0
    assert merged.first_scheduled_time == 1.0


def test_an_output_with_no_event_has_its_tokens_delivered_by_the_next() -> None:
    timing = StreamTiming(0.0)
    assert timing.stamp(output(1, 1), final=False)["tokens"] == 1
    # step 2 made a token whose text is held back: no event; step 3's event delivers both
    later = timing.stamp(output(3, 3), final=True)
    assert later["tokens"] == 2 and later["step"] == 3
    assert later["queued_s"] is None and later["prefill_s"] is None  # not reported
