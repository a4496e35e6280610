"""Triton's ``GRPCInferenceService`` as one servicer, for both of rillet's gRPC hosts.

grpc.aio (``rillet serve``'s gRPC door, ``grpc_server.py``) and Ray Serve's gRPC proxy (each
replica of ``rillet.deploy.ray`` is this servicer) call the same methods, named as the RPCs.
The hosts differ in how a failed call gets its status, so the servicer is told that when it
is made, as a :data:`SetError`:

* :func:`abort` (grpc.aio): ``context.abort`` ends the call there and then (it raises);
* :func:`set_status` (Ray Serve): the proxy sends the code and details the method left on its
  context once the method returns, so the method returns an empty message (or ends its
  stream) after setting them.

The context parameter is named ``grpc_context`` on every method: Ray Serve passes the
context by that keyword (and only to methods that have it), grpc.aio by position. And
``ModelStreamInfer`` is an async generator, the one form of a streaming method both take.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rillet.errors import RilletError
from rillet.kserve import grpc_service_pb2 as pb
from rillet.server.kserve.handler import KServeHandler

#: How a host sets the status of a call that failed with a RilletError.
SetError = Callable[[Any, RilletError], Awaitable[None]]
#: Responses on their way to a stream's reader, then its end: None, or what ended it.
_Item = pb.ModelStreamInferResponse | Exception | None
#: Responses a stream holds for a slow reader before its requests wait to write.
_STREAM_BUFFER = 64

_Message = TypeVar("_Message")


def trailing_metadata(error: RilletError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` (seconds) in a failed call's trailers when the error carries one."""
    if error.retry_after_s is None:
        return ()
    return (("retry-after", str(error.retry_after_s)),)


async def abort(grpc_context: Any, error: RilletError) -> None:
    """grpc.aio: end the call with the error table's code (``abort`` raises, so this never
    returns)."""
    await grpc_context.abort(
        grpc.StatusCode[error.grpc_code], error.message, trailing_metadata(error)
    )


async def set_status(grpc_context: Any, error: RilletError) -> None:
    """Ray Serve's proxy: leave the error table's code and the message on the context; the
    proxy sends them when the method returns."""
    grpc_context.set_code(grpc.StatusCode[error.grpc_code])
    grpc_context.set_details(error.message)
    if error.retry_after_s is not None:
        grpc_context.set_trailing_metadata(trailing_metadata(error))


class KServeServicer:
    """The RPCs of ``GRPCInferenceService`` over a :class:`KServeHandler`: the API key from
    the call's metadata on the inference RPCs, and a failed call's status set by
    ``set_error`` (:func:`abort` or :func:`set_status`)."""

    def __init__(self, handler: KServeHandler, set_error: SetError) -> None:
        self.handler = handler
        self.set_error = set_error

    async def ServerLive(
        self, request: pb.ServerLiveRequest, grpc_context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, grpc_context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handler.service.is_ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, grpc_context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.handler.model_ready(request.name))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context: Any
    ) -> pb.ServerMetadataResponse:
        return self.handler.server_metadata()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: Any
    ) -> pb.ModelMetadataResponse:
        try:
            return self.handler.model_metadata(request.name)
        except RilletError as exc:
            return await self._failed(grpc_context, exc, pb.ModelMetadataResponse())

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, grpc_context: Any
    ) -> pb.ModelConfigResponse:
        try:
            return self.handler.model_config(request.name)
        except RilletError as exc:
            return await self._failed(grpc_context, exc, pb.ModelConfigResponse())

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: Any
    ) -> pb.ModelInferResponse:
        try:
            self.handler.authorize(grpc_context.invocation_metadata())
            return await self.handler.infer(request)
        except RilletError as exc:
            return await self._failed(grpc_context, exc, pb.ModelInferResponse())

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], grpc_context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            self.handler.authorize(grpc_context.invocation_metadata())
        except RilletError as exc:
            await self.set_error(grpc_context, exc)
            return
        # The call's requests write their responses into a bounded queue, which this
        # generator hands to the host: a slow reader slows its requests' writes (the engine
        # merges their deltas meanwhile), never the engine.
        responses: asyncio.Queue[_Item] = asyncio.Queue(_STREAM_BUFFER)
        work = asyncio.ensure_future(self._run_stream(requests, responses))
        try:
            while isinstance(item := await responses.get(), pb.ModelStreamInferResponse):
                yield item
            if item is not None:
                raise item
        finally:
            # A call that ends early (the client went away) aborts its requests, and the
            # call ends once they are aborted.
            work.cancel()
            await asyncio.wait([work])

    async def _run_stream(
        self, requests: AsyncIterator[pb.ModelInferRequest], responses: asyncio.Queue[_Item]
    ) -> None:
        """The call's requests, then the end after their last response: None, or the
        exception that stopped them. A cancelled run puts no end: its reader has gone."""
        end: Exception | None = None
        try:
            await self.handler.stream_infer(requests, responses.put)
        except Exception as exc:
            end = exc
        await responses.put(end)

    async def _failed(self, grpc_context: Any, error: RilletError, empty: _Message) -> _Message:
        """``empty``, after setting the call's status (grpc.aio's ``abort`` raises instead)."""
        await self.set_error(grpc_context, error)
        return empty
