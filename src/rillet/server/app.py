"""The HTTP app: ``create_app(engine, config)`` wires routes, errors, metrics and lifespan.

Every failure a client can cause is answered as JSON in the route's own format (TGI's
``{"error","error_type"}``, or OpenAI's ``{"error":{...}}`` under ``/v1``), including
unknown routes, wrong methods and bodies FastAPI never sees. Auth, the body limit and the
concurrency limit are applied by the routes through ``body.py`` and ``state.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from rillet import __version__
from rillet.errors import NotFoundError, RilletError, ValidationError
from rillet.server import openai_api, tgi
from rillet.server.config import ServerConfig
from rillet.server.errors import error_response, is_openai_path
from rillet.server.metrics import CONTENT_TYPE
from rillet.server.sse import ClientGone
from rillet.server.state import ServerState, state_of

if TYPE_CHECKING:
    from rillet.engine.async_engine import AsyncEngine

log = logging.getLogger("rillet.server")


def create_app(
    engine: AsyncEngine, config: ServerConfig | None = None, *, owns_engine: bool = True
) -> FastAPI:
    """A FastAPI app serving ``engine``. With ``owns_engine`` the app's shutdown stops it."""
    config = config or ServerConfig()
    max_input, max_total = config.resolve_limits(engine.max_model_len)
    state = ServerState(
        engine=engine,
        config=config,
        model_name=config.served_model_name or engine.model_name,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.draining = True
        if owns_engine:
            await engine.shutdown()

    app = FastAPI(
        title="rillet",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.rillet = state
    app.include_router(tgi.router)
    app.include_router(openai_api.router)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    _add_error_handlers(app)
    return app


async def metrics(request: Request) -> Response:
    state = state_of(request)
    body = state.metrics.render(state.engine.stats(), state.admission.in_flight)
    return Response(body, media_type=CONTENT_TYPE)


def _add_error_handlers(app: FastAPI) -> None:
    async def on_rillet_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RilletError)  # registered for RilletError only
        return error_response(exc, request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            error: RilletError = NotFoundError(f"no route {request.method} {request.url.path}")
        else:
            error = ValidationError(str(exc.detail))
            error.http_status = exc.status_code
            error.error_type = "method_not_allowed" if exc.status_code == 405 else "validation"
        response = error_response(error, request.url.path)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_request_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(ValidationError(f"{where}: {first['msg']}"), request.url.path)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # Nobody is listening; 499 (nginx's "client closed request") shows in access logs.
        return Response(status_code=499)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        message = f"internal error: {type(exc).__name__}"
        if is_openai_path(request.url.path):
            body = {"error": {"message": message, "type": "internal", "param": None, "code": 500}}
            return JSONResponse(body, 500)
        return JSONResponse({"error": message, "error_type": "internal"}, 500)

    app.add_exception_handler(RilletError, on_rillet_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
