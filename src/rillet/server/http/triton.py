"""Triton's HTTP routes: the generate extension and KServe v2 health and metadata.

``POST /v2/models/{model}[/versions/{v}]/generate`` answers one JSON object;
``.../generate_stream`` answers Server-Sent Events, ``data: {json}`` per response, and an
error after the first event arrives in-band as ``data: {"error": "..."}`` (the status is
already 200). As in Triton (``http_server.cc``), each top-level key of the body and each key
of its ``parameters`` becomes an input of that name when the model has one, else a request
parameter; the answer's keys are the outputs (one-element tensors as scalars) and the
response's id, model name and version. The mapping itself is the KServe dialect's, as on
the gRPC door.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet import __version__
from rillet.errors import RilletError, ValidationError
from rillet.server import kserve
from rillet.server.generation import Generation
from rillet.server.http.body import (
    parse_json,
    read_body,
    request_options,
    require_api_key,
    service_of,
)
from rillet.server.http.errors import ErrorFormat, rendered_by
from rillet.server.http.openapi import json_body
from rillet.server.http.respond import collect_answer, stream_response
from rillet.server.http.sse import sse_event
from rillet.server.timing import TIMING_KEY


def _status(exc: RilletError) -> int:
    """Triton answers bad input with 400; the rest keep the table's status."""
    return 400 if exc.http_status == 422 else exc.http_status


TRITON_ERRORS = ErrorFormat(lambda exc: {"error": exc.message}, _status)

router = APIRouter(prefix="/v2", route_class=rendered_by(TRITON_ERRORS))
_auth = [Depends(require_api_key)]
_INPUT_NAMES = {name for name, _, _ in kserve.INPUTS}
#: Triton's generate extension: the model's inputs as top-level fields, beside ``parameters``.
_body = json_body(
    {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "text_input": {"type": "string"},
            "parameters": {"type": "object"},
        },
    }
)


def _decode(model: str, body: dict[str, Any]) -> kserve.KServeRequest:
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValidationError("`parameters` must be a JSON object")
    inputs: dict[str, list[Any]] = {}
    request_parameters: dict[str, Any] = {}
    for key, value in [*body.items(), *parameters.items()]:
        if key in ("id", "parameters"):
            continue
        if key in _INPUT_NAMES:
            inputs[key] = value if isinstance(value, list) and key != "messages" else [value]
        else:
            request_parameters[key] = value
    request_id = body.get("id", "")
    return kserve.KServeRequest(
        id=str(request_id), model_name=model, inputs=inputs, parameters=request_parameters
    )


def _answer(
    model: str,
    request: kserve.KServeRequest,
    outputs: list[kserve.Output],
    finish_detail: str | None = None,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``rillet_finish_detail`` (``timeout``) is added when the request's timeout ended it,
    ``rillet_timing`` when it asked for timing."""
    answer: dict[str, Any] = {"model_name": model, "model_version": "1"}
    if request.id:
        answer["id"] = request.id
    for output in outputs:
        values = [v.decode() if isinstance(v, bytes) else v for v in output.values]
        answer[output.name] = values[0] if len(values) == 1 else values
    if finish_detail is not None:
        answer["rillet_finish_detail"] = finish_detail
    if timing is not None:
        answer[TIMING_KEY] = timing
    return answer


def _start(
    request: Request, model: str, body: dict[str, Any], route: str, one_response: bool
) -> tuple[Generation, kserve.KServePlan, kserve.KServeRequest]:
    service = service_of(request)
    decoded = _decode(model, body)
    kserve.check_model(model, service.model_name)
    generation, plan = service.start(
        route, lambda: kserve.plan(decoded, one_response=one_response), request_options(request)
    )
    return generation, plan, decoded


@router.post("/models/{model}/generate", dependencies=_auth, openapi_extra=_body)
@router.post(
    "/models/{model}/versions/{version}/generate",
    dependencies=_auth,
    include_in_schema=False,  # the same route, pinned to a version
)
async def generate(request: Request, model: str) -> Response:
    body = parse_json(await read_body(request))
    generation, plan, decoded = _start(request, model, body, "triton_generate", True)
    result = await collect_answer(request, generation)
    outputs = kserve.KServeRenderer(plan).answer(result)
    return JSONResponse(_answer(model, decoded, outputs, result.finish_detail))


@router.post("/models/{model}/generate_stream", dependencies=_auth, openapi_extra=_body)
@router.post(
    "/models/{model}/versions/{version}/generate_stream",
    dependencies=_auth,
    include_in_schema=False,  # the same route, pinned to a version
)
async def generate_stream(request: Request, model: str) -> Response:
    body = parse_json(await read_body(request))
    generation, plan, decoded = _start(request, model, body, "triton_generate_stream", False)
    return stream_response(
        generation,
        _events(model, decoded, generation, plan),
        TRITON_ERRORS,
        media_type="text/event-stream; charset=utf-8",
    )


async def _events(
    model: str, decoded: kserve.KServeRequest, generation: Generation, plan: kserve.KServePlan
) -> AsyncIterator[bytes]:
    renderer = kserve.KServeRenderer(plan, generation.timing)
    if not plan.stream:  # one event with the whole answer
        result = await generation.collect()
        outputs, timing = renderer.answer(result), renderer.stamp(result, True)
        yield sse_event(_answer(model, decoded, outputs, result.finish_detail, timing))
        return
    async with contextlib.aclosing(generation.stream()) as stream:
        async for out in stream:
            if out.text or out.finished:
                outputs, timing = renderer.delta(out), renderer.stamp(out, out.finished)
                yield sse_event(_answer(model, decoded, outputs, out.finish_detail, timing))


@router.get("/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if service_of(request).is_ready else 503)


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "rillet", "version": __version__, "extensions": ["generate"]}


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, model: str) -> dict[str, Any]:
    kserve.check_model(model, service_of(request).model_name)

    def tensors(specs: list[tuple[str, str, list[int]]]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in specs]

    return {
        "name": model,
        "versions": ["1"],
        "platform": "rillet",
        "inputs": tensors(kserve.INPUTS),
        "outputs": tensors(kserve.OUTPUTS),
    }


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, model: str) -> Response:
    """200 when ready, 503 while not (draining, the engine down); an unknown model is 404."""
    service = service_of(request)
    kserve.check_model(model, service.model_name)
    return Response(status_code=200 if service.is_ready else 503)
