"""ServerConfig: everything the front doors need besides the engine, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from rillet.errors import ValidationError


@dataclass(frozen=True)
class ServerConfig:
    """Options of ``rillet serve`` that belong to the server, not the engine.

    ``max_input_tokens`` / ``max_total_tokens`` of ``None`` follow the engine's context
    (``max_total_tokens = max_model_len``, ``max_input_tokens = max_total_tokens - 1``);
    ``TokenLimits.resolve`` settles them once the engine is loaded.
    ``max_stop_sequences`` and ``max_top_n_tokens`` are TGI's defaults (4 and 5);
    ``max_top_n_tokens`` applies to the TGI routes only (OpenAI's ``top_logprobs`` goes up
    to 20, ``sampling.py``). The limits on what a request carries (body, headers, stop
    sequences, messages) hold on every door.
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
    #: All request headers together (names and values), as a browser's cookies may need.
    max_header_bytes: int = 16_384
    max_stop_sequences: int = 4
    max_stop_length: int = 512
    max_messages: int = 1024
    #: Characters of a constraint's source (a JSON schema's text, a regex, a grammar): its
    #: compile time and memory grow with it, and it is compiled in the engine's process.
    max_grammar_length: int = 65_536
    max_top_n_tokens: int = 5
    #: A ``:`` comment goes out after this long without an event, so proxies with idle
    #: timeouts (commonly 30-60 s) keep the stream open while a request waits or prefills.
    keep_alive_interval_s: float = 5.0
    #: Seconds a resumable stream (``X-Rillet-Resumable: 1``) nobody reads is kept, its
    #: generation still running, for ``GET /streams/<sid>``; 0 turns resumable streams off.
    resume_window_s: float = 30.0
    #: Events kept for resumes, all streams together and per stream (the oldest go first).
    max_resume_bytes: int = 64 << 20
    max_resume_stream_bytes: int = 4 << 20
    #: Output one stream may have waiting for a stalled reader (text bytes plus a fixed
    #: size per token) before the request is aborted with an in-band error.
    max_stream_buffer_bytes: int = 16 << 20
    #: The most engine steps a stream's tokens may wait to go out as one event when the host
    #: is busy (``engine/pacing.py``); 1: every step's tokens go out at once. Not TGI's
    #: ``/generate_stream``, which sends one event per token anyway.
    max_merge_steps: int = 4
    #: Milliseconds a request may wait for its first token unless it says otherwise
    #: (``X-Rillet-Max-Queue-Ms``); None: no deadline.
    max_queue_ms: int | None = None
    #: Seconds a whole request may take unless it says otherwise (``X-Rillet-Timeout-Ms``);
    #: then it ends with what it has. None: no timeout.
    request_timeout_s: float | None = None
    #: On SIGINT/SIGTERM, streams in flight get this long to finish before they are ended
    #: with an error event.
    shutdown_grace_s: float = 10.0
    #: ``--default-temperature`` & co.: what a request that leaves the field unset gets,
    #: before the model's own defaults (``sampling_defaults.py``). None: no server default.
    default_temperature: float | None = None
    default_top_p: float | None = None
    default_top_k: int | None = None
    default_min_p: float | None = None
    default_repetition_penalty: float | None = None

    @property
    def default_sampling(self) -> dict[str, float | int | None]:
        """The ``--default-*`` flags by sampling field name."""
        return {
            "temperature": self.default_temperature,
            "top_p": self.default_top_p,
            "top_k": self.default_top_k,
            "min_p": self.default_min_p,
            "repetition_penalty": self.default_repetition_penalty,
        }

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_requests",
            "max_input_tokens",
            "max_total_tokens",
            "max_body_bytes",
            "max_header_bytes",
            "max_stop_sequences",
            "max_stop_length",
            "max_messages",
            "max_grammar_length",
            "max_resume_bytes",
            "max_resume_stream_bytes",
            "max_stream_buffer_bytes",
            "max_merge_steps",
            "max_queue_ms",
            "request_timeout_s",
        ):
            value = getattr(self, name)  # None: follow the engine (the token limits)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.keep_alive_interval_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("keep-alive interval must be positive, grace non-negative")
        if self.resume_window_s < 0:
            raise ValueError("--resume-window must not be negative")
        from rillet.server.sampling_defaults import SamplingDefaults

        try:
            SamplingDefaults(self.default_sampling, {})
        except ValidationError as exc:
            raise ValueError(f"a --default-* sampling flag: {exc}") from None
