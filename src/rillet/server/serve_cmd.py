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
from typing import TYPE_CHECKING, Any

import uvicorn

from rillet.config import KV_CACHE_DTYPES
from rillet.server.config import ServerConfig

if TYPE_CHECKING:
    import grpc

    from rillet.config import EngineConfig
    from rillet.server.service import GenerationService

log = logging.getLogger("rillet.server")

#: ``rillet serve``'s defaults are ServerConfig's own.
_DEFAULTS = ServerConfig()


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
    p.add_argument("--model", help="model folder or .gguf file (default: bundled SmolLM2-135M)")
    p.add_argument("--host", default=_DEFAULTS.host, help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=_DEFAULTS.port, help="port (0 picks a free one)")
    p.add_argument("--expose", action="store_true", help="bind 0.0.0.0 instead of --host")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=_DEFAULTS.grpc_port,
        help="port of the gRPC door (Triton's KServe v2, for tritonclient), on the same host "
        "as HTTP (default %(default)s; 0 turns it off)",
    )
    p.add_argument("--served-model-name", help="model name shown in /info and responses")
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=_DEFAULTS.max_concurrent_requests,
        help="generations in flight on every door together; past it a request is refused at "
        "once with 429 `overloaded` (default: %(default)s)",
    )
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--max-batch-tokens", type=int, help="engine token budget per step")
    p.add_argument(
        "--max-prefill-tokens-when-decoding",
        type=int,
        help="prompt tokens a step may add beside running streams' decodes, which bounds "
        "their inter-token gap while prompts prefill (default: the whole step budget)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        metavar="GIB",
        help="GiB for the KV cache (default: a fifth of the memory available at start, "
        "between 0.5 and 8; on CPU, RAM is taken only as the cache fills)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        help="auto: K/V in the model's dtype; int8: 8 bits with an fp32 scale per 32 values, "
        "1.8x the tokens in the same memory and fewer bytes to read per token (default: int8 "
        "for bf16 on a CPU with rillet's kernels, else auto)",
    )
    # What a request may carry, on every door; past each limit a clear 4xx.
    for option, what in (
        ("--max-body-bytes", "request body size, 413 past it (JSON may nest at most 64 levels)"),
        ("--max-header-bytes", "all request headers together, 431 past it"),
        ("--max-stop-sequences", "stop sequences per request, as TGI and OpenAI"),
        ("--max-stop-length", "characters per stop sequence"),
        ("--max-messages", "chat messages per request"),
        ("--max-resume-bytes", "events kept for resumable streams, all together"),
        ("--max-resume-stream-bytes", "events kept for one resumable stream"),
    ):
        default = getattr(_DEFAULTS, option.removeprefix("--").replace("-", "_"))
        p.add_argument(option, type=int, default=default, help=f"{what} (default: %(default)s)")
    p.add_argument(
        "--resume-window",
        type=float,
        default=_DEFAULTS.resume_window_s,
        help="seconds a resumable stream (request header `X-Rillet-Resumable: 1`) waits for "
        "its client to come back (GET /streams/SID with Last-Event-ID) before its generation "
        "is aborted; 0 turns resumable streams off (default: %(default)s)",
    )
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on generation routes")
    p.add_argument("--dtype", default=None, help="auto (default), float32, bfloat16, float16")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--small-batch-tokens",
        type=int,
        default=0,
        help="engine steps of at most this many tokens run on one thread, leaving a core "
        "to the HTTP side (default 0: always all threads; the engine has its own process)",
    )
    p.add_argument(
        "--quantized-max-batch-tokens",
        type=int,
        default=None,
        help="steps of at most this many tokens use 4-bit copies of the weights (8-bit LM "
        "head); 0 = off (default: on for 4-bit checkpoints such as the bundled model)",
    )
    p.add_argument(
        "--engine-in-process",
        action="store_true",
        help="run the engine core on a thread of the server process, not in a process of its "
        "own (slower when busy: the HTTP side and the model then share one GIL)",
    )
    p.add_argument(
        "--keep-alive-interval",
        type=float,
        default=_DEFAULTS.keep_alive_interval_s,
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=_DEFAULTS.shutdown_grace_s,
        help="seconds streams may run on after SIGINT/SIGTERM",
    )
    sampling = p.add_argument_group(
        "sampling defaults",
        "What a request that leaves a field unset gets: this flag, else the model's own default "
        "(generation_config.json, or a GGUF's general.sampling.*), else the API's (OpenAI: "
        "temperature 1, top_p 1; TGI stays greedy unless the request samples). /info lists the "
        "defaults in force and where each came from.",
    )
    for name, kind in (
        ("temperature", float),
        ("top-p", float),
        ("top-k", int),
        ("min-p", float),
        ("repetition-penalty", float),
    ):
        sampling.add_argument(f"--default-{name}", type=kind, metavar="X")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def configs_of(options: Any, **server: Any) -> tuple[EngineConfig, ServerConfig]:
    """The engine's and the server's configuration from ``rillet serve``'s options, by their
    names (argparse's namespace, or ``rillet.deploy.ray``'s arguments); ``server`` adds what
    only the caller knows (where to listen)."""
    from rillet.config import EngineConfig

    engine = EngineConfig.from_env(
        model=options.model,
        dtype=options.dtype,
        max_model_len=options.max_total_tokens,
        max_num_batched_tokens=options.max_batch_tokens,
        max_prefill_tokens_when_decoding=options.max_prefill_tokens_when_decoding,
        kv_cache_memory_bytes=(
            None if options.kv_cache_memory is None else int(options.kv_cache_memory * (1 << 30))
        ),
        kv_cache_dtype=options.kv_cache_dtype,
        num_threads=options.threads,
        small_batch_tokens=options.small_batch_tokens,
        quantized_max_batch_tokens=options.quantized_max_batch_tokens,
    )
    config = ServerConfig(
        served_model_name=options.served_model_name,
        max_concurrent_requests=options.max_concurrent_requests,
        max_input_tokens=options.max_input_tokens,
        max_total_tokens=options.max_total_tokens,
        api_key=options.api_key,
        keep_alive_interval_s=options.keep_alive_interval,
        max_body_bytes=options.max_body_bytes,
        max_header_bytes=options.max_header_bytes,
        max_stop_sequences=options.max_stop_sequences,
        max_stop_length=options.max_stop_length,
        max_messages=options.max_messages,
        resume_window_s=options.resume_window,
        max_resume_bytes=options.max_resume_bytes,
        max_resume_stream_bytes=options.max_resume_stream_bytes,
        default_temperature=options.default_temperature,
        default_top_p=options.default_top_p,
        default_top_k=options.default_top_k,
        default_min_p=options.default_min_p,
        default_repetition_penalty=options.default_repetition_penalty,
        **server,
    )
    return engine, config


def run(args: argparse.Namespace) -> int:
    from rillet.engine.async_engine import AsyncEngine
    from rillet.errors import RilletError
    from rillet.server.http.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        engine_config, server_config = configs_of(
            args,
            host="0.0.0.0" if args.expose else args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            shutdown_grace_s=args.shutdown_grace,
        )
        with _Progress(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'}"):
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
            from rillet.server.grpc_server import start_grpc_server

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
    print(f"rillet: serving {service.model_name} on {url} (bound to {host}:{port})", flush=True)
    print(f"  TGI:    {url}/generate_stream   OpenAI: {url}/v1   metrics: {url}/metrics")
    print("  try:", flush=True)
    print(
        f"  curl -N {url}/generate_stream -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(body)}",
        flush=True,
    )


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
