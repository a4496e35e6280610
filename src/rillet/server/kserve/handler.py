"""The gRPC door's logic: Triton's ``inference.GRPCInferenceService`` (KServe v2) on protobuf
messages and the generation service, with no gRPC context (``servicer.py`` wraps it).

Stock ``tritonclient[grpc]`` works against it unmodified. ``ModelStreamInfer`` carries many
requests on one call: each runs in a task of its own, its responses carry its ``id``, and the
last one has ``triton_final_response`` set (or an empty response of its own does, when the
request asks with ``triton_enable_empty_final_response``). A request that fails (unknown
model, bad tensors, overload) gets an ``error_message`` response naming its id, and the
stream stays open. The call ends once the client has half-closed and every request in it
has finished (``stop_stream()`` waits for exactly that).

The door stands on the generation service like every other: the same admission count, the
API key from ``authorization: Bearer`` metadata, one cancellation path (a cancelled call
cancels its requests' tasks, which aborts them in the engine), the error table's gRPC codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from rillet import __version__
from rillet.errors import RilletError, ValidationError
from rillet.kserve import grpc_service_pb2 as pb
from rillet.kserve import tensors
from rillet.server import kserve
from rillet.server.auth import bearer_token
from rillet.server.deadlines import RequestOptions
from rillet.server.generation import Generation
from rillet.server.service import GenerationService
from rillet.server.timing import TIMING_KEY

Write = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]
_DATA_TYPES = {
    "BYTES": pb.TYPE_STRING,
    "BOOL": pb.TYPE_BOOL,
    "UINT32": pb.TYPE_UINT32,
    "FP32": pb.TYPE_FP32,
}


def decode_request(request: pb.ModelInferRequest) -> kserve.KServeRequest:
    """Tensors as Python values (ValidationError on a malformed tensor)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ValidationError(
            f"{len(raw)} raw input contents for {len(request.inputs)} inputs: one each is needed"
        )
    inputs: dict[str, list[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        contents = tensor.contents if tensor.HasField("contents") else None
        inputs[tensor.name] = tensors.decode(
            tensor.name, tensor.datatype, list(tensor.shape), raw[i] if raw else None, contents
        )
    return kserve.KServeRequest(
        id=request.id,
        model_name=request.model_name,
        inputs=inputs,
        parameters={name: _parameter(value) for name, value in request.parameters.items()},
        requested_outputs=[output.name for output in request.outputs],
    )


def _parameter(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice is not None else None


def infer_response(
    request: pb.ModelInferRequest, outputs: Sequence[kserve.Output], final: bool | None
) -> pb.ModelInferResponse:
    """A response with raw outputs; ``final`` sets ``triton_final_response`` (not on unary)."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=[len(output.values)])
        response.raw_output_contents.append(tensors.encode(output.datatype, output.values))
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


def error_response(
    request: pb.ModelInferRequest, error: RilletError
) -> pb.ModelStreamInferResponse:
    """An in-stream error, as Triton sends one: the id is in the message too, because
    tritonclient hands the callback the message and not the response. An error with a
    retry hint (``overloaded``) carries it as the ``retry_after`` parameter (seconds)."""
    message = f"[request id: {request.id or '<none>'}] {error.error_type}: {error.message}"
    response = infer_response(request, [], final=True)
    if error.retry_after_s is not None:
        response.parameters["retry_after"].int64_param = error.retry_after_s
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


def with_finish_detail(
    response: pb.ModelInferResponse, finish_detail: str | None
) -> pb.ModelInferResponse:
    """``rillet_finish_detail`` (``timeout``) as a response parameter, when there is one."""
    if finish_detail is not None:
        response.parameters["rillet_finish_detail"].string_param = finish_detail
    return response


def with_timing(response: pb.ModelInferResponse, timing: dict[str, Any] | None) -> None:
    """``rillet_timing`` as a string parameter holding its compact JSON, when asked for:
    one parameter with the same object as every other door's, not five typed ones."""
    if timing is not None:
        response.parameters[TIMING_KEY].string_param = json.dumps(timing, separators=(",", ":"))


class KServeHandler:
    """The service's RPCs on protobuf messages, with no grpc context (auth is the caller's)."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service

    def authorize(self, metadata: Any) -> None:
        """The API key from a call's metadata (``authorization: Bearer KEY``)."""
        self.service.check_key(bearer_token(dict(metadata or ()).get("authorization")))

    # ---- health and metadata --------------------------------------------------------

    def model_ready(self, name: str) -> bool:
        return name in kserve.model_names(self.service.model_name) and self.service.is_ready

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="rillet", version=__version__, extensions=["model_configuration", "generate"]
        )

    def model_metadata(self, name: str) -> pb.ModelMetadataResponse:
        kserve.check_model(name, self.service.model_name)
        response = pb.ModelMetadataResponse(name=name, versions=["1"], platform="rillet")
        for field, specs in ((response.inputs, kserve.INPUTS), (response.outputs, kserve.OUTPUTS)):
            for tensor_name, datatype, shape in specs:
                field.add(name=tensor_name, datatype=datatype, shape=shape)
        return response

    def model_config(self, name: str) -> pb.ModelConfigResponse:
        kserve.check_model(name, self.service.model_name)
        config = pb.ModelConfig(name=name, platform="rillet", backend="rillet", max_batch_size=0)
        config.model_transaction_policy.decoupled = True
        for tensor_name, datatype, shape in kserve.INPUTS:
            config.input.add(
                name=tensor_name,
                data_type=_DATA_TYPES[datatype],
                dims=shape,
                optional=tensor_name != "text_input",
            )
        for tensor_name, datatype, shape in kserve.OUTPUTS:
            config.output.add(name=tensor_name, data_type=_DATA_TYPES[datatype], dims=shape)
        return pb.ModelConfigResponse(config=config)

    # ---- inference ------------------------------------------------------------------

    def start(
        self, request: pb.ModelInferRequest, route: str, one_response: bool = False
    ) -> tuple[Generation, kserve.KServePlan]:
        """Admit and plan one request (a RilletError if it cannot run)."""
        decoded = decode_request(request)
        kserve.check_model(decoded.model_name, self.service.model_name)
        options = RequestOptions.from_fields(decoded.parameters)
        return self.service.start(
            route, lambda: kserve.plan(decoded, one_response=one_response), options
        )

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """``ModelInfer``: the one whole answer."""
        generation, plan = self.start(request, "grpc_infer", one_response=True)
        result = await generation.run(generation.collect())
        outputs = kserve.KServeRenderer(plan).answer(result)
        return with_finish_detail(infer_response(request, outputs, None), result.finish_detail)

    async def stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], write: Write
    ) -> None:
        """``ModelStreamInfer``: every request on the call, concurrently, until the client
        has half-closed and all have finished. Cancelling this cancels them all."""
        running: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                task = asyncio.ensure_future(self._one(request, write))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(set(running))

    async def _one(self, request: pb.ModelInferRequest, write: Write) -> None:
        try:
            generation, plan = self.start(request, "grpc_stream")
        except RilletError as exc:
            await write(error_response(request, exc))
            return
        await generation.run(self._respond(request, generation, plan, write))

    async def _respond(
        self,
        request: pb.ModelInferRequest,
        generation: Generation,
        plan: kserve.KServePlan,
        write: Write,
    ) -> None:
        try:
            renderer = kserve.KServeRenderer(plan, generation.timing)
            flag_on_data = not plan.empty_final
            if plan.stream:
                async with contextlib.aclosing(generation.stream()) as outputs:
                    async for out in outputs:
                        if out.text or out.finished:
                            data = renderer.delta(out)
                            final = out.finished and flag_on_data
                            response = infer_response(request, data, final)
                            with_timing(response, renderer.stamp(out, out.finished))
                            await write(_streamed(with_finish_detail(response, out.finish_detail)))
            else:
                result = await generation.collect()
                data = renderer.answer(result)
                response = infer_response(request, data, flag_on_data)
                with_timing(response, renderer.stamp(result, True))
                await write(_streamed(with_finish_detail(response, result.finish_detail)))
            if plan.empty_final:
                await write(_streamed(infer_response(request, [], final=True)))
        except RilletError as exc:
            await write(error_response(request, exc))


def _streamed(response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=response)
