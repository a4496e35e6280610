"""The one KServe servicer as Ray Serve's gRPC proxy drives a replica, on a fake engine:
the context passed by the keyword ``grpc_context``, a failed call's status read off the
context after the method returns (``set_status``), ``ModelStreamInfer`` iterated as an async
generator and closed the way Serve closes it. (grpc.aio's way, ``abort``, is
``test_grpc_server.py``'s, through real clients.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest

from fake_engine import FakeEngine
from rillet.client.streaming import build_request, text_of
from rillet.kserve import grpc_service_pb2 as pb
from rillet.kserve import tensors
from rillet.server.config import ServerConfig
from rillet.server.kserve.handler import KServeHandler
from rillet.server.kserve.servicer import KServeServicer, set_status
from rillet.server.service import GenerationService

pytestmark = pytest.mark.timeout(30)

MODEL = "fake-model"
KEY = [("authorization", "Bearer k3y")]


class RayContext:
    """What Serve hands a replica's method (``RayServegRPCContext``): the call's metadata
    in, a status code and details out."""

    def __init__(self, metadata: Iterable[tuple[str, str]] = ()) -> None:
        self.metadata = list(metadata)
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def ray_servicer(**config: Any) -> tuple[KServeServicer, FakeEngine, GenerationService]:
    engine = FakeEngine()
    service = GenerationService(engine, ServerConfig(**config))  # type: ignore[arg-type]
    return KServeServicer(KServeHandler(service), set_status), engine, service


def request(prompt: str, request_id: str, max_tokens: int, stream: bool = True) -> Any:
    made = build_request(MODEL, prompt, None, {"max_tokens": max_tokens})
    made.id = request_id
    if not stream:
        made.raw_input_contents[1] = tensors.encode("BOOL", [False])
    return made


async def over(*requests: Any) -> AsyncIterator[Any]:
    for made in requests:
        yield made


async def test_a_failed_call_leaves_its_status_on_the_context_and_returns_empty() -> None:
    servicer, engine, _ = ray_servicer(api_key="k3y")
    context = RayContext()
    answer = await servicer.ModelInfer(request("Hi", "1", 2, stream=False), grpc_context=context)
    assert answer == pb.ModelInferResponse()
    assert context.code == grpc.StatusCode.UNAUTHENTICATED and context.details
    context = RayContext()
    metadata = await servicer.ModelMetadata(pb.ModelMetadataRequest(name="nope"), context)
    assert metadata == pb.ModelMetadataResponse() and context.code == grpc.StatusCode.NOT_FOUND
    context = RayContext(KEY)
    refused = await servicer.ModelInfer(request("Hi", "2", 2), grpc_context=context)
    assert refused == pb.ModelInferResponse()
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT  # `stream` on the one-answer RPC
    context = RayContext()
    stream = servicer.ModelStreamInfer(over(request("Hi", "3", 2)), grpc_context=context)
    assert [response async for response in stream] == []
    assert context.code == grpc.StatusCode.UNAUTHENTICATED and not engine.requests


async def test_a_call_that_succeeds_sets_no_status() -> None:
    servicer, _, _ = ray_servicer(api_key="k3y")
    context = RayContext(KEY)
    answer = await servicer.ModelInfer(request("Hi", "1", 2, stream=False), grpc_context=context)
    assert answer.id == "1" and tensors.unpack_bytes(answer.raw_output_contents[0]) == [b"HiHe"]
    stream = servicer.ModelStreamInfer(
        over(request("Hi", "a", 3), request("Hi", "b", 2)), grpc_context=context
    )
    texts: dict[str, str] = {"a": "", "b": ""}
    finals = []
    async for response in stream:
        text, final = text_of(response)
        texts[response.infer_response.id] += text
        finals += [response.infer_response.id] if final else []
    assert texts == {"a": "Hel", "b": "He"} and sorted(finals) == ["a", "b"]
    assert context.code is None


async def test_a_stream_ends_when_its_reader_lags_behind_a_full_buffer() -> None:
    # More one-response requests than the buffer holds, read slowly: the buffer is full when
    # the last request finishes, and the stream still ends after its last response.
    servicer, _, _ = ray_servicer()
    many = [request("Hi", str(i), 1, stream=False) for i in range(80)]
    stream = servicer.ModelStreamInfer(over(*many), grpc_context=RayContext())

    async def read_slowly() -> list[str]:
        ids = []
        async for response in stream:
            ids.append(response.infer_response.id)
            await asyncio.sleep(0.005)
        return ids

    ids = await asyncio.wait_for(read_slowly(), timeout=10)
    assert sorted(ids, key=int) == [str(i) for i in range(80)]


async def test_closing_the_stream_as_serve_does_aborts_its_requests_first() -> None:
    servicer, engine, service = ray_servicer()
    engine.pause()

    async def held_open() -> AsyncIterator[Any]:
        yield request("Hi", "p", 5)
        yield request("Hi", "q", 5)
        await asyncio.Event().wait()  # the client keeps the call open

    stream = servicer.ModelStreamInfer(held_open(), grpc_context=RayContext())
    seen = {(await anext(stream)).infer_response.id for _ in range(2)}
    assert seen == {"p", "q"}
    # The client went away: Serve throws CancelledError into the method's generator.
    with pytest.raises(asyncio.CancelledError):
        await stream.athrow(asyncio.CancelledError())
    assert len(engine.aborted) == 2 and service.in_flight == 0 and not engine.running
