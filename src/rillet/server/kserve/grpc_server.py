"""The gRPC door of ``rillet serve``: Triton's ``GRPCInferenceService`` on grpc.aio (port 8001)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from rillet.errors import RilletError
from rillet.kserve import grpc_service_pb2 as pb
from rillet.kserve.rpc import add_GRPCInferenceServiceServicer_to_server
from rillet.server.kserve.handler import KServeHandler
from rillet.server.service import GenerationService

#: Above gRPC's 4 MiB default: tritonclient itself allows messages up to 2 GiB.
MAX_MESSAGE_BYTES = 64 << 20


class GrpcServicer:
    """The grpc.aio servicer: the API key from metadata, errors as the table's codes."""

    def __init__(self, handler: KServeHandler) -> None:
        self.handler = handler

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handler.service.is_ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.handler.model_ready(request.name))

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return self.handler.server_metadata()

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        return await _answer(context, lambda: self.handler.model_metadata(request.name))

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        return await _answer(context, lambda: self.handler.model_config(request.name))

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        await self._authorize(context)
        try:
            return await self.handler.infer(request)
        except RilletError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)
            raise  # abort() raises; this line is for the type checker

    async def ModelStreamInfer(self, requests: Any, context: Any) -> None:
        await self._authorize(context)
        lock = asyncio.Lock()

        async def write(response: pb.ModelStreamInferResponse) -> None:
            async with lock:  # one write at a time on a call
                await context.write(response)

        await self.handler.stream_infer(requests, write)

    async def _authorize(self, context: Any) -> None:
        try:
            self.handler.authorize(context.invocation_metadata())
        except RilletError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)


async def _answer(context: Any, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except RilletError as exc:
        await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)


async def start_grpc_server(
    service: GenerationService, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC door on ``host:port`` (0: any free port); ``(server, bound port)``.

    ``SO_REUSEPORT`` is off: a second server on the same port fails here, loudly, instead
    of silently sharing the port's connections with the first.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    add_GRPCInferenceServiceServicer_to_server(GrpcServicer(KServeHandler(service)), server)
    bracketed = f"[{host}]" if ":" in host else host
    bound = server.add_insecure_port(f"{bracketed}:{port}")
    await server.start()
    return server, bound
