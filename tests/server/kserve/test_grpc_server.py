"""The gRPC door on a fake engine the test holds, driven by stock ``tritonclient.grpc``
(sync and aio) and rillet's ``StreamingClient``: interleaving by id, the final flag and the
empty final response, errors that keep the stream open, overload, the key, cancellation,
health, metadata and config."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from app_server import grpc_door
from polling import poll_until
from rillet.client import AsyncStreamingClient, OverloadedError, StreamingClient
from rillet.client import AuthenticationError as ClientAuthError
from triton_inputs import vllm_inputs

pytestmark = pytest.mark.timeout(30)

MODEL = "fake-model"


def collect(results: queue.Queue[Any], ids: set[str]) -> list[tuple[str, str, bool]]:
    """``(id, text or error, final)`` per callback until every id in ``ids`` is final."""
    seen: list[tuple[str, str, bool]] = []
    pending = set(ids)
    while pending:
        result, error = results.get(timeout=20)
        if error is not None:
            seen.append(("error", str(error), True))
            pending = {i for i in pending if f"[request id: {i}]" not in str(error)}
            continue
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        text = result.as_numpy("text_output")[0].decode() if response.outputs else ""
        seen.append((response.id, text, final))
        if final:
            pending.discard(response.id)
    return seen


async def test_sync_client_streams_two_requests_interleaved_on_one_stream() -> None:
    async with grpc_door() as d:
        d.engine.pause()
        results: queue.Queue[Any] = queue.Queue()

        def run() -> list[tuple[str, str, bool]]:
            with tc.InferenceServerClient(d.target) as client:
                client.start_stream(callback=lambda result, error: results.put((result, error)))
                client.async_stream_infer(
                    MODEL, vllm_inputs("Hi", sampling={"max_tokens": 5}), request_id="a"
                )
                client.async_stream_infer(
                    MODEL, vllm_inputs("Hi", sampling={"max_tokens": "2"}), request_id="b"
                )
                seen = collect(results, {"a", "b"})
                client.stop_stream()  # returns once the server ended the call
            return seen

        worker = asyncio.ensure_future(asyncio.to_thread(run))
        await d.engine.wait_running(2)
        await d.engine.step()  # both have 2 tokens out now: "b" is done, "a" is not
        d.engine.resume()
        seen = await worker
    by_id = {key: [(text, final) for rid, text, final in seen if rid == key] for key in "ab"}
    assert by_id["a"] == [("H", False), ("e", False), ("l", False), ("l", False), ("o", True)]
    assert by_id["b"] == [("H", False), ("e", True)]
    order = [rid for rid, _, _ in seen]
    assert order.index("b", 1) < len(order) - 1  # "b" finished while "a" was still streaming
    assert d.service.in_flight == 0


async def test_aio_stream_infer_ends_each_request_with_the_final_flag() -> None:
    async with grpc_door() as d, tc_aio.InferenceServerClient(d.target) as client:

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for key, model in (("x", MODEL), ("y", MODEL + ".streaming")):  # NuPIC's alias
                sampling = {"max_tokens": 3}
                yield {
                    "model_name": model,
                    "inputs": vllm_inputs("Hi", sampling=sampling),
                    "request_id": key,
                }

        seen = []
        async for result, error in client.stream_infer(requests()):
            assert error is None
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            seen.append((response.id, result.as_numpy("text_output")[0].decode(), final))
            if sum(1 for s in seen if s[2]) == 2:
                break
    for key in "xy":
        assert [s for s in seen if s[0] == key] == [
            (key, "H", False),
            (key, "e", False),
            (key, "l", True),
        ]


async def test_the_empty_final_response_when_asked_for() -> None:
    async with grpc_door() as d:
        results: queue.Queue[Any] = queue.Queue()

        def run() -> list[tuple[str, str, bool, int]]:
            with tc.InferenceServerClient(d.target) as client:
                client.start_stream(callback=lambda result, error: results.put((result, error)))
                for key, empty_final in (("plain", False), ("empty", True)):
                    client.async_stream_infer(
                        MODEL,
                        vllm_inputs("Hi", sampling={"max_tokens": 2}),
                        request_id=key,
                        enable_empty_final_response=empty_final,
                    )
                seen = []
                while sum(1 for s in seen if s[2]) < 2:
                    result, error = results.get(timeout=20)
                    assert error is None, error
                    response = result.get_response()
                    final = response.parameters["triton_final_response"].bool_param
                    seen.append((response.id, "", final, len(response.outputs)))
                client.stop_stream()
            return seen

        seen = await asyncio.to_thread(run)
    assert [(f, n) for key, _, f, n in seen if key == "plain"] == [(False, 1), (True, 1)]
    # Asked for, the flag comes alone on an empty response, after the last token's.
    assert [(f, n) for key, _, f, n in seen if key == "empty"] == [
        (False, 1),
        (False, 1),
        (True, 0),
    ]


async def test_errors_name_their_request_and_the_stream_stays_open() -> None:
    async with grpc_door() as d:
        results: queue.Queue[Any] = queue.Queue()

        def run() -> list[tuple[str, str, bool]]:
            with tc.InferenceServerClient(d.target) as client:
                client.start_stream(callback=lambda result, error: results.put((result, error)))
                client.async_stream_infer("nope", vllm_inputs("Hi"), request_id="unknown")
                bad = vllm_inputs("Hi", sampling={"max_tokens": 2})
                bad[2].set_data_from_numpy(np.array([b"{not json"], dtype=np.object_))
                client.async_stream_infer(MODEL, bad, request_id="badjson")
                wrong_type = tc.InferInput("text_input", [1], "INT32")
                wrong_type.set_data_from_numpy(np.array([5], dtype=np.int32))
                client.async_stream_infer(MODEL, [wrong_type], request_id="badtype")
                missing = [tc.InferInput("stream", [1], "BOOL")]
                missing[0].set_data_from_numpy(np.array([True], dtype=bool))
                client.async_stream_infer(MODEL, missing, request_id="missing")
                client.async_stream_infer(
                    MODEL, vllm_inputs("Hi", sampling={"max_tokens": 1}), request_id="fine"
                )
                seen = collect(results, {"unknown", "badjson", "badtype", "missing", "fine"})
                client.stop_stream()
            return seen

        seen = await asyncio.to_thread(run)
    errors = sorted(text for rid, text, _ in seen if rid == "error")
    assert len(errors) == 4
    assert any("[request id: unknown] not_found: unknown model 'nope'" in e for e in errors)
    assert any("[request id: badjson] validation:" in e and "JSON" in e for e in errors)
    assert any("[request id: badtype] validation:" in e for e in errors)
    assert any(
        "[request id: missing] validation: input 'text_input' is required" in e for e in errors
    )
    assert ("fine", "H", True) in seen
    assert d.service.in_flight == 0


async def test_overload_is_an_in_stream_error_and_resource_exhausted_on_unary() -> None:
    async with (
        grpc_door(max_concurrent_requests=1) as d,
        tc_aio.InferenceServerClient(d.target) as client,
    ):
        d.engine.pause()
        holder = StreamingClient(MODEL, url=d.target)
        held = asyncio.ensure_future(asyncio.to_thread(holder.generate, "Hi", max_tokens=5))
        await d.engine.wait_running(1)
        with pytest.raises(InferenceServerException) as unary:
            await client.infer(MODEL, vllm_inputs("Hi", stream=False))
        assert unary.value.status() == "StatusCode.RESOURCE_EXHAUSTED"

        async def one() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": MODEL, "inputs": vllm_inputs("Hi"), "request_id": "busy"}

        async for result, error in client.stream_infer(one()):
            assert result is None and "[request id: busy] overloaded: Model is overloaded" in str(
                error
            )
            break
        async with AsyncStreamingClient(MODEL, url=d.target) as ours:
            with pytest.raises(OverloadedError):
                await ours.generate("Hi")
        d.engine.resume()
        assert await held == "Hello"
        holder.close()


async def test_the_key_is_checked_on_inference_only() -> None:
    async with grpc_door(api_key="k3y") as d, tc_aio.InferenceServerClient(d.target) as client:
        assert await client.is_server_live() and await client.is_model_ready(MODEL)
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                await client.infer(MODEL, vllm_inputs("Hi", stream=False), headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(ClientAuthError):
            await AsyncStreamingClient(MODEL, url=d.target, api_key="wrong").generate("Hi")
        answer = await client.infer(
            MODEL,
            vllm_inputs("Hi", stream=False, sampling={"max_tokens": 2}),
            headers={"authorization": "Bearer k3y"},
        )
        # Not streamed, the prompt starts the one answer (vLLM's exclude_input_in_output).
        assert answer.as_numpy("text_output")[0].decode() == "HiHe"
        ours = AsyncStreamingClient(MODEL, url=d.target, api_key="k3y")
        assert await ours.generate("Hi", max_tokens=3) == "Hel"
        await ours.close()
        assert len(d.engine.requests) == 2


async def test_cancelling_the_stream_aborts_its_requests() -> None:
    async with grpc_door() as d, tc_aio.InferenceServerClient(d.target) as client:
        d.engine.pause()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for key in ("p", "q"):
                yield {
                    "model_name": MODEL,
                    "inputs": vllm_inputs("Hi", sampling={"max_tokens": 5}),
                    "request_id": key,
                }
            await asyncio.Event().wait()  # the client keeps the call open

        stream = client.stream_infer(requests())
        seen = set()
        async for result, _ in stream:
            seen.add(result.get_response().id)
            if seen == {"p", "q"}:
                break
        stream.cancel()
        await poll_until(lambda: len(d.engine.aborted) == 2 and d.service.in_flight == 0)
        assert not d.engine.running and not d.engine.finished


async def test_streaming_client_calls_back_in_order_and_returns_the_join() -> None:
    async with grpc_door() as d:
        pieces: list[str] = []
        client = StreamingClient(MODEL, url=d.target)
        text = await asyncio.to_thread(client.generate, "Hi", pieces.append, max_tokens=5)
        chat = await asyncio.to_thread(
            client.generate, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        client.close()
    assert pieces == list("Hello") and text == "".join(pieces)
    assert chat == "He"
    prompt = d.engine.tokenizer.decode(d.engine.requests[1].prompt_token_ids)
    assert prompt == "user\nHi\nassistant\n"  # the chat template, rendered on the server


async def test_health_metadata_config_and_unimplemented_rpcs() -> None:
    async with grpc_door() as d, tc_aio.InferenceServerClient(d.target) as client:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready(MODEL) and not await client.is_model_ready("nope")
        server = await client.get_server_metadata(as_json=True)
        assert server["name"] == "rillet"
        metadata = await client.get_model_metadata(MODEL, as_json=True)
        assert {i["name"] for i in metadata["inputs"]} >= {
            "text_input",
            "stream",
            "sampling_parameters",
        }
        assert metadata["outputs"][0] == {
            "name": "text_output",
            "datatype": "BYTES",
            "shape": ["-1"],
        }
        config = (await client.get_model_config(MODEL, as_json=True))["config"]
        assert config["model_transaction_policy"] == {"decoupled": True}
        assert config["max_batch_size"] == 0 if "max_batch_size" in config else True
        with pytest.raises(InferenceServerException) as unknown:
            await client.get_model_metadata("nope")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as missing:
            await client.get_inference_statistics(MODEL)
        assert missing.value.status() == "StatusCode.UNIMPLEMENTED"
        d.service.draining = True
        assert not await client.is_server_ready()
        assert not await client.is_model_ready(MODEL)
