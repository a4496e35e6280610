"""``rillet serve``: load the model, bind, print how to reach it, serve, drain on a signal.

Shutdown on SIGINT/SIGTERM: the listening socket closes at once (new connections are
refused, new requests on open connections get 503), streams in flight get
``--shutdown-grace`` seconds to finish, then the engine stops, which ends the rest with an
in-band error event; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from rillet.server.serve_options import add_arguments, configs_of

if TYPE_CHECKING:
    import grpc

    from rillet.config import EngineConfig
    from rillet.server.service import GenerationService

log = logging.getLogger("rillet.server")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` (imports nothing heavy: torch loads only when it runs)."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model: TGI, OpenAI, WebSocket, Triton HTTP and gRPC, streaming tokens",
        description="Serve a model with token streaming over TGI's HTTP API (/generate, "
        "/generate_stream), OpenAI's (/v1/chat/completions, /v1/completions), plain text "
        "(POST /?prompt=), WebSockets (/ and /ws), a browser page (GET /), Triton's HTTP "
        "generate (/v2/models/NAME/generate_stream) and Triton's gRPC (KServe v2).",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rillet.engine.async_engine import AsyncEngine
    from rillet.errors import RilletError
    from rillet.server.http.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        engine_config, server_config = configs_of(
            vars(args), host="0.0.0.0" if args.expose else args.host
        )
        _compile_kernels_first(engine_config)
        with _Progress(f"loading {model_label(args.model)}"):
            engine = AsyncEngine.from_config(engine_config, own_process=not args.engine_in_process)
        app = create_app(engine, server_config)
    except (RilletError, ValueError, OSError) as exc:
        print(f"rillet serve: {exc}", file=sys.stderr)
        return 1

    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=3,
    )
    try:
        sock = uv_config.bind_socket()
    except SystemExit:  # uvicorn reports bind errors itself, then exits
        return 1
    # Listen now, before the gRPC door binds. A socket that is only bound lets another bind
    # its port (both set SO_REUSEADDR), and then both listened: a test's /health once got
    # the gRPC door's HTTP/2 preface, its --grpc-port being the port --port 0 had picked.
    sock.listen(uv_config.backlog)
    _print_banner(app.state.rillet, sock)
    server = _DrainingServer(uv_config, app.state.rillet)
    # uvicorn re-raises the SIGINT it handled once it is done: that is our normal exit.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 1 if server.failed else 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server with the gRPC door beside it and a drain step before shutdown."""

    def __init__(self, config: uvicorn.Config, service: GenerationService) -> None:
        super().__init__(config)
        self.service = service
        self.grpc_server: grpc.aio.Server | None = None
        self.failed = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.service.config
        if config.grpc_port:
            from rillet.server.kserve.grpc_server import start_grpc_server

            try:
                self.grpc_server, port = await start_grpc_server(
                    self.service, config.host, config.grpc_port
                )
            except RuntimeError as exc:  # the port is taken (SO_REUSEPORT is off)
                print(
                    f"rillet serve: cannot serve gRPC on port {config.grpc_port}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                self.failed = self.should_exit = True
                return
            shown = "127.0.0.1" if config.host == "0.0.0.0" else config.host
            print(f"  gRPC:   {shown}:{port} (KServe v2, tritonclient)", flush=True)
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # refuse new connections while we drain
        grace = self.service.config.shutdown_grace_s
        log.info("draining: up to %.0fs for requests in flight", grace)
        await self.service.drain(grace, give_up=lambda: self.force_exit)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        await super().shutdown(sockets)


def _print_banner(service: GenerationService, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    url = f"http://{shown}:{port}"
    body = '{"inputs":"Write a haiku about rivers.","parameters":{"max_new_tokens":48}}'
    auth = ""
    if service.config.api_key:
        auth = f" -H {shlex.quote('Authorization: Bearer ' + service.config.api_key)}"
    print(
        f"rillet: ready, serving {service.model_name} on {url} (bound to {host}:{port})", flush=True
    )
    print(f"  TGI:    {url}/generate_stream   OpenAI: {url}/v1   metrics: {url}/metrics")
    print("  try:", flush=True)
    print(
        f"  curl -N {url}/generate_stream -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(body)}",
        flush=True,
    )


def model_label(model: str | None) -> str:
    """``--model`` as the loading line names it, with its size: ``qwen2.5-coder-1.5b
    (1.1 GB)``, ``the bundled SmolLM2-135M-Instruct (98 MB)``, ``./m.gguf (253 MB)``."""
    from rillet.models.catalogue import CATALOGUE, DEFAULT_MODEL, find_entry, format_size

    if model is None:
        bundled = CATALOGUE[DEFAULT_MODEL]
        name = bundled.file_name.split(".")[0]
        return f"the bundled {name} ({format_size(bundled.size)})"
    path = Path(model).expanduser()
    if path.is_file():
        return f"{model} ({format_size(path.stat().st_size)})"
    if path.is_dir():
        weights = [*path.glob("*.safetensors"), *path.glob("*.gguf")]
        return f"{model} ({format_size(sum(p.stat().st_size for p in weights))})"
    entry = find_entry(model)
    return f"{entry.name} ({format_size(entry.size)})" if entry else model


def _compile_kernels_first(config: EngineConfig) -> None:
    """Compile the CPU kernels here, saying so, when this start is the one that must: the
    engine process then imports them (a minute of silence behind "loading" otherwise)."""
    from rillet.models import cpu_kernels

    if not config.native_kernels or config.device not in ("auto", "cpu") or cpu_kernels.is_built():
        return
    import torch  # only now: a start that need not compile never imports it here

    if config.device == "auto" and torch.cuda.is_available():
        return
    with _Progress(cpu_kernels.COMPILE_NOTICE):
        cpu_kernels.load()


class _Progress:
    """Elapsed seconds on one line while the model loads (plain start/done lines off a tty)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._done = threading.Event()
        self._start = time.monotonic()
        self._tty = sys.stderr.isatty()

    def __enter__(self) -> _Progress:
        print(f"rillet: {self.what}...", file=sys.stderr, flush=True)
        if self._tty:
            threading.Thread(target=self._tick, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        took = time.monotonic() - self._start
        status = "failed" if exc[0] is not None else "done"
        print(f"\rrillet: {self.what}: {status} in {took:.1f}s", file=sys.stderr, flush=True)

    def _tick(self) -> None:
        while not self._done.wait(0.5):
            took = time.monotonic() - self._start
            print(f"\r  {took:5.1f}s", end="", file=sys.stderr, flush=True)
