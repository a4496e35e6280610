"""Serve an ASGI app with real uvicorn on 127.0.0.1, inside the test's own event loop.

For fast tests of the doors on a :class:`~fake_engine.FakeEngine`: real sockets and real
clients, while the test holds and releases the fake engine's requests on the same loop.
``door(**ServerConfig fields)`` serves rillet's app on a fresh fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from fake_engine import FakeEngine
from rillet.server.config import ServerConfig
from rillet.server.http.app import create_app
from rillet.server.service import GenerationService


@contextlib.asynccontextmanager
async def serving(app: Any, send_buffer: int | None = None) -> AsyncIterator[str]:
    """``async with serving(app) as url``: uvicorn on a free loopback port until exit.

    ``send_buffer`` fixes each connection's socket send buffer (accepted sockets inherit the
    listening socket's), so a client that stops reading stalls the server's writes soon.
    """
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    sockets = None
    if send_buffer is not None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        listener.bind(("127.0.0.1", 0))
        sockets = [listener]
    task = asyncio.ensure_future(server.serve(sockets=sockets))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Door:
    """rillet's HTTP app on a fake engine, served on loopback, with a client for it."""

    url: str
    engine: FakeEngine
    service: GenerationService
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def door(
    generation_defaults: dict[str, Any] | None = None, max_model_len: int = 256, **config: Any
) -> AsyncIterator[Door]:
    """``async with door(max_concurrent_requests=1) as d``: a fresh fake engine and app;
    ``generation_defaults`` stand in for the model's generation_config.json, and
    ``max_model_len`` is the fake model's context (one token per character)."""
    engine = FakeEngine(max_model_len=max_model_len)
    engine.generation_defaults = dict(generation_defaults or {})
    app = create_app(engine, ServerConfig(**config), owns_engine=False)  # type: ignore[arg-type]
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Door(url, engine, app.state.rillet, http)


@contextlib.asynccontextmanager
async def held_stream(d: Door) -> AsyncIterator[None]:
    """One TGI stream in flight and held in the engine until the block exits."""
    d.engine.pause()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
    async with d.http.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        await d.engine.wait_running(1)
        yield
        d.engine.resume()
        await response.aread()


@dataclass
class GrpcDoor:
    """The gRPC door on a fake engine, on loopback: ``target`` is ``127.0.0.1:port``."""

    target: str
    engine: FakeEngine
    service: GenerationService


@contextlib.asynccontextmanager
async def grpc_door(**config: Any) -> AsyncIterator[GrpcDoor]:
    """``async with grpc_door(max_concurrent_requests=1) as d``: KServe v2 on a fake engine."""
    from rillet.server.kserve.grpc_server import start_grpc_server

    engine = FakeEngine()
    service = GenerationService(engine, ServerConfig(**config))  # type: ignore[arg-type]
    server, port = await start_grpc_server(service, "127.0.0.1", 0)
    try:
        yield GrpcDoor(f"127.0.0.1:{port}", engine, service)
    finally:
        await server.stop(grace=None)
