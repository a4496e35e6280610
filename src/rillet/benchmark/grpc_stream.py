"""One request streamed over Triton's gRPC protocol (``ModelStreamInfer``), timed as the SSE
streamer times its requests: TTFT and gaps at the client, as each response is read.

Every request is its own call on one shared channel (HTTP/2 multiplexes them), sends the
prompt as a chat (the ``messages`` input, like the chat API's body) with the run's sampling
fields, and asks for ``num_output_tokens`` and ``finish_reason`` to count what it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from rillet.benchmark.stream import RequestRecord
from rillet.benchmark.workload import BenchConfig, Prompt
from rillet.kserve import grpc_service_pb2 as pb
from rillet.kserve import tensors
from rillet.kserve.rpc import Stub


def infer_request(config: BenchConfig, index: int, prompt: Prompt) -> pb.ModelInferRequest:
    sampling = config.sampling(prompt)
    messages = [dict(m) for m in prompt.messages]
    request = pb.ModelInferRequest(model_name=config.model, id=str(index))
    for name, datatype, value in (
        ("messages", "BYTES", json.dumps(messages).encode()),
        ("stream", "BOOL", True),
        ("sampling_parameters", "BYTES", json.dumps(sampling).encode()),
        ("return_num_output_tokens", "BOOL", True),
        ("return_finish_reason", "BOOL", True),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(tensors.encode(datatype, [value]))
    if config.server_timing:
        request.parameters["timing"].bool_param = True
    return request


async def stream_grpc_request(
    stub: Stub, config: BenchConfig, record: RequestRecord
) -> RequestRecord:
    """Fill ``record`` from one streamed call; failures go into ``record.error``."""
    prompt = config.prompt(record.index)
    record.max_tokens = config.max_tokens_of(prompt)
    request = infer_request(config, record.index, prompt)

    async def one() -> AsyncIterator[pb.ModelInferRequest]:
        yield request

    metadata = [("authorization", f"Bearer {config.api_key}")] if config.api_key else []
    start = time.perf_counter()
    call = stub.ModelStreamInfer(one(), metadata=metadata)
    try:
        async with asyncio.timeout(config.request_timeout):
            async for response in call:
                now = time.perf_counter()
                if response.error_message:
                    record.error = f"error response: {response.error_message[:160]}"
                    break
                outputs = _outputs(response.infer_response)
                text = outputs.get("text_output", b"").decode()
                record.usage_tokens = (record.usage_tokens or 0) + int(
                    outputs.get("num_output_tokens", 0)
                )
                if text:
                    record.add_delta(text, now, start)
                parameters = response.infer_response.parameters
                if config.server_timing and "rillet_timing" in parameters:
                    record.add_server_timing(json.loads(parameters["rillet_timing"].string_param))
                if parameters["triton_final_response"].bool_param:
                    record.finish_reason = outputs.get("finish_reason", b"").decode() or None
                    break
        record.status = 200
        record.latency = time.perf_counter() - start
        if record.error is None and record.num_deltas == 0:
            record.error = "no content in the stream"
        elif record.error is None and record.finish_reason is None:
            record.error = "stream ended before its final response"
    except TimeoutError:
        record.error = f"timeout after {config.request_timeout:g}s"
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"[:200]
    except asyncio.CancelledError:
        record.cancelled = True
        raise
    finally:
        call.cancel()
    return record


def _outputs(response: pb.ModelInferResponse) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for i, output in enumerate(response.outputs):
        decoded = tensors.decode(
            output.name, output.datatype, list(output.shape), response.raw_output_contents[i], None
        )
        values[output.name] = decoded[0] if decoded else None
    return values


@contextlib.asynccontextmanager
async def grpc_sender(
    config: BenchConfig,
) -> AsyncIterator[Callable[[RequestRecord], Awaitable[RequestRecord]]]:
    """A channel to ``config.grpc_target`` and the send function the runner calls."""
    channel = grpc.aio.insecure_channel(config.grpc_target)
    stub = Stub(channel)
    try:
        yield lambda record: stream_grpc_request(stub, config, record)
    finally:
        await channel.close()
