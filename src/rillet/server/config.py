"""ServerConfig: everything the HTTP front door needs besides the engine, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Options of ``rillet serve`` that belong to the server, not the engine.

    ``max_input_tokens`` / ``max_total_tokens`` of ``None`` follow the engine's context
    (``max_total_tokens = max_model_len``, ``max_input_tokens = max_total_tokens - 1``);
    :meth:`resolve_limits` settles them once the engine is loaded.
    ``max_stop_sequences`` and ``max_top_n_tokens`` are TGI's defaults (4 and 5) and apply
    to the TGI routes only; OpenAI routes allow up to 4 stop strings too (as OpenAI does)
    and ``top_logprobs`` up to 20.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 8001
    served_model_name: str | None = None
    max_concurrent_requests: int = 128
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    api_key: str | None = None
    #: TGI's ``--payload-limit`` default.
    max_body_bytes: int = 2_000_000
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    #: A ``:`` comment goes out after this long without an event, so proxies with idle
    #: timeouts keep the stream open while a request waits or prefills (issue: <= 10 s).
    keep_alive_interval_s: float = 5.0
    #: On SIGINT/SIGTERM, streams in flight get this long to finish before they are ended
    #: with an error event.
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_concurrent_requests <= 0:
            raise ValueError("--max-concurrent-requests must be positive")
        for name in ("max_input_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.keep_alive_interval_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("keep-alive interval must be positive, grace non-negative")
        if self.max_body_bytes <= 0:
            raise ValueError("the body size limit must be positive")

    def resolve_limits(self, max_model_len: int) -> tuple[int, int]:
        """``(max_input_tokens, max_total_tokens)`` for an engine of this context length."""
        total = min(self.max_total_tokens or max_model_len, max_model_len)
        max_input = min(self.max_input_tokens or total - 1, total - 1)
        if max_input <= 0:
            raise ValueError("--max-total-tokens leaves no room for input tokens")
        return max_input, total
