"""The HTTP app: ``create_app(engine, config)`` wires the doors onto one generation service.

Every route family renders its own failures (``errors.py``); the handlers here only answer
what no route took: unknown routes and wrong methods, in the format the path suggests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rillet import __version__
from rillet.errors import (
    HeadersTooLargeError,
    MethodNotAllowedError,
    NotFoundError,
    RilletError,
    ValidationError,
)
from rillet.server import ws
from rillet.server.config import ServerConfig
from rillet.server.http import anthropic, openai, openapi, page, responses, streams, tgi, triton
from rillet.server.http.body import service_of
from rillet.server.http.errors import format_for_path
from rillet.server.metrics import CONTENT_TYPE
from rillet.server.service import EngineLike, GenerationService


def create_app(
    engine: EngineLike, config: ServerConfig | None = None, *, owns_engine: bool = True
) -> FastAPI:
    """A FastAPI app serving ``engine``. With ``owns_engine`` the app's shutdown stops it."""
    service = GenerationService(engine, config or ServerConfig())
    return create_service_app(service, owns_engine=owns_engine)


def create_service_app(
    service: GenerationService, *, owns_engine: bool = True, instance: str | None = None
) -> FastAPI:
    """The HTTP doors over an existing service (which other doors may share).

    ``instance`` names this server in an ``x-rillet-replica`` header on every response (a
    Ray Serve replica: which of them answered).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.draining = True
        await service.streams.close()
        if owns_engine:
            await service.engine.shutdown()

    app = FastAPI(
        title="rillet",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.rillet = service
    app.include_router(page.router)
    app.include_router(tgi.router)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(triton.router)
    app.include_router(streams.router)
    app.mount("/static", page.static_files(), name="static")
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_api_websocket_route("/", ws.tutorial_chat)
    app.add_api_websocket_route("/ws", ws.multiplexed)
    _add_fallback_handlers(app)
    openapi.install(app)
    if instance is not None:
        app.add_middleware(InstanceHeader, instance=instance)
    app.add_middleware(HeaderLimit, limit=service.config.max_header_bytes)
    return app


class HeaderLimit:
    """Pure ASGI middleware: requests whose headers together pass ``limit`` bytes get 431 in
    their route's error format (a WebSocket handshake is refused), before any route runs."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.limit:
                exc = HeadersTooLargeError(f"the request headers pass {self.limit} bytes")
                if scope["type"] == "websocket":
                    await ws.refuse_handshake(WebSocket(scope, receive, send), exc)
                    return
                await format_for_path(scope["path"]).response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InstanceHeader:
    """Pure ASGI middleware: ``x-rillet-replica: <instance>`` on every HTTP response (no
    buffering, so streams stream)."""

    def __init__(self, app: ASGIApp, instance: str) -> None:
        self.app = app
        self.header = (b"x-rillet-replica", instance.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


async def metrics(request: Request) -> Response:
    return Response(service_of(request).render_metrics(), media_type=CONTENT_TYPE)


def _add_fallback_handlers(app: FastAPI) -> None:
    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        error: RilletError
        if exc.status_code == 404:
            error = NotFoundError(f"no route {request.method} {path}")
        elif exc.status_code == 405:
            error = MethodNotAllowedError(str(exc.detail))
        else:
            error = ValidationError(str(exc.detail))
        response = format_for_path(path).response(error)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_request_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return format_for_path(request.url.path).response(
            ValidationError(f"{where}: {first['msg']}")
        )

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
