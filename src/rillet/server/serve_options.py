"""``rillet serve``'s options, each declared once: name, type, default, help, and the config
field it fills.

Everything else is built from :data:`SERVE_OPTIONS`: the command line
(:func:`add_arguments`), the Ray builder's arguments (``rillet.deploy.ray.RayAppArgs``) and
the configs (:func:`configs_of`). A new option is one :class:`Option` here. Cheap to import
(no torch, no pydantic): ``rillet --help`` registers every command.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rillet.config import KV_CACHE_DTYPES, EngineConfig
from rillet.server.config import ServerConfig

_SERVER_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ServerConfig)}


@dataclass(frozen=True)
class Option:
    """One option: ``--max-batch-tokens`` on the command line, ``max_batch_tokens`` to Ray.

    ``type`` parses the value (``bool``: a flag, off unless given). ``engine`` and ``server``
    name the :class:`EngineConfig` / :class:`ServerConfig` field it fills (either, both, or
    neither for what only the caller reads), through ``to_config`` when set. An option that
    fills a ServerConfig field takes that field's default (so the two cannot drift apart);
    an engine option's ``None`` leaves the engine its own default (or ``RILLET_*``'s, which
    a default of the option's own would hide). ``on_ray=False``: the command line only
    (where to listen, logging: Serve's proxies and Ray do those). ``group``: a heading of
    :data:`GROUPS` in ``--help``.
    """

    name: str
    type: type[Any] = str
    help: str | None = None
    default: Any = None
    engine: str | None = None
    server: str | None = None
    to_config: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    on_ray: bool = True
    group: str | None = None

    def __post_init__(self) -> None:
        if self.server is not None:
            if self.default is not None:
                raise ValueError(f"{self.name}: its default is ServerConfig.{self.server}'s")
            object.__setattr__(self, "default", _SERVER_DEFAULTS[self.server])
        if self.type is bool:
            object.__setattr__(self, "default", False)

    @property
    def flag(self) -> str:
        """The command line's spelling: ``--max-batch-tokens``."""
        return "--" + self.name.replace("_", "-")


def _gib_to_bytes(gib: float) -> int:
    return int(gib * (1 << 30))


SAMPLING = "sampling defaults"
#: ``--help``'s headings for options of a ``group``, and what each says.
GROUPS = {
    SAMPLING: "What a request that leaves a field unset gets: this flag, else the model's own "
    "default (generation_config.json, or a GGUF's general.sampling.*), else the API's (OpenAI: "
    "temperature 1, top_p 1; TGI stays greedy unless the request samples). /info lists the "
    "defaults in force and where each came from.",
}

#: Every ``rillet serve`` option, in ``--help``'s order.
SERVE_OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        help="model folder, .gguf file, or a name from `rillet models` (default: the bundled "
        "SmolLM2-135M)",
        engine="model",
    ),
    Option("host", help="address to bind (default: loopback)", server="host", on_ray=False),
    Option("port", int, "port (0 picks a free one)", server="port", on_ray=False),
    Option("expose", bool, "bind 0.0.0.0 instead of --host", on_ray=False),
    Option(
        "grpc_port",
        int,
        "port of the gRPC door (Triton's KServe v2, for tritonclient), on the same host as HTTP "
        "(default %(default)s; 0 turns it off)",
        server="grpc_port",
        on_ray=False,
    ),
    Option(
        "served_model_name",
        help="model name shown in /info and responses",
        server="served_model_name",
    ),
    Option(
        "max_concurrent_requests",
        int,
        "generations in flight on every door together; past it a request is refused at once "
        "with 429 `overloaded` (default: %(default)s)",
        server="max_concurrent_requests",
    ),
    Option("max_input_tokens", int, server="max_input_tokens"),
    # One context length: the engine's and the one requests are checked against.
    Option("max_total_tokens", int, engine="max_model_len", server="max_total_tokens"),
    Option(
        "max_batch_tokens", int, "engine token budget per step", engine="max_num_batched_tokens"
    ),
    Option(
        "max_prefill_tokens_when_decoding",
        int,
        "prompt tokens a step may add beside running streams' decodes, which bounds their "
        "inter-token gap while prompts prefill (default: the whole step budget)",
        engine="max_prefill_tokens_when_decoding",
    ),
    Option(
        "kv_cache_memory",
        float,
        "GiB for the KV cache (default: a fifth of the memory available at start, between 0.5 "
        "and 8; on CPU, RAM is taken only as the cache fills)",
        engine="kv_cache_memory_bytes",
        to_config=_gib_to_bytes,
        metavar="GIB",
    ),
    Option(
        "kv_cache_dtype",
        help="auto: K/V in the model's dtype; int8: 8 bits with an fp32 scale per 32 values, 1.8x "
        "the tokens in the same memory and fewer bytes to read per token (default: int8 for bf16 "
        "on a CPU with rillet's kernels, else auto)",
        engine="kv_cache_dtype",
        choices=KV_CACHE_DTYPES,
    ),
    # What a request may carry, on every door; past each limit a clear 4xx.
    *(
        Option(name, int, f"{what} (default: %(default)s)", server=name)
        for name, what in (
            ("max_body_bytes", "request body size, 413 past it (JSON may nest at most 64 levels)"),
            ("max_header_bytes", "all request headers together, 431 past it"),
            ("max_stop_sequences", "stop sequences per request, as TGI and OpenAI"),
            ("max_stop_length", "characters per stop sequence"),
            ("max_messages", "chat messages per request"),
            ("max_grammar_length", "characters of a JSON schema, regex or grammar constraint"),
            ("max_resume_bytes", "events kept for resumable streams, all together"),
            ("max_resume_stream_bytes", "events kept for one resumable stream"),
            (
                "max_stream_buffer_bytes",
                "output one stream may have waiting for a reader that stopped reading (text "
                "bytes, plus 64 per token); past it the request is aborted and the reader gets "
                "one in-band `incomplete_generation` error",
            ),
        )
    ),
    Option(
        "max_merge_steps",
        int,
        "when many streams are open (more than 8 per engine step) or the event loop runs late, "
        "a stream's tokens of up to this many engine steps go out as one event, which cuts the "
        "host's CPU per token; a stream's first token and its end never wait; 1: every token "
        "goes out as soon as it is sampled; TGI's one-event-per-token stream never merges "
        "(default: %(default)s)",
        server="max_merge_steps",
    ),
    Option(
        "resume_window",
        float,
        "seconds a resumable stream (request header `X-Rillet-Resumable: 1`) waits for its "
        "client to come back (GET /streams/SID with Last-Event-ID) before its generation is "
        "aborted; 0 turns resumable streams off (default: %(default)s)",
        server="resume_window_s",
    ),
    Option(
        "max_queue_ms",
        int,
        "milliseconds a request may wait for its first token, unless it sends its own "
        "X-Rillet-Max-Queue-Ms: one the queue cannot serve in time is refused at once with 429 "
        "`overloaded` (retry-after: the queue's drain time), one admitted but still without a "
        "token then is ended with the same error (default: no deadline)",
        server="max_queue_ms",
    ),
    Option(
        "request_timeout",
        float,
        "seconds a whole request may take, unless it sends its own X-Rillet-Timeout-Ms: then it "
        'ends with what it has, finish reason `length` and "rillet_finish_detail": "timeout" '
        "(default: none)",
        server="request_timeout_s",
    ),
    Option(
        "api_key", help="require `Authorization: Bearer KEY` on generation routes", server="api_key"
    ),
    Option("dtype", help="auto (default), float32, bfloat16, float16", engine="dtype"),
    Option("threads", int, "torch threads (default: torch's choice)", engine="num_threads"),
    Option(
        "small_batch_tokens",
        int,
        "engine steps of at most this many tokens run on one thread, leaving a core to the HTTP "
        "side (default 0: always all threads; the engine has its own process)",
        default=0,
        engine="small_batch_tokens",
    ),
    Option(
        "quantized_max_batch_tokens",
        int,
        "steps of at most this many tokens use 4-bit copies of the weights (8-bit LM head); 0 = "
        "off (default: on for 4-bit checkpoints such as the bundled model)",
        engine="quantized_max_batch_tokens",
    ),
    Option(
        "speculative",
        help="speculative decoding: ngram drafts tokens by prompt lookup (the last tokens "
        "matched in the prompt and output so far), draft:NAME by a smaller model of the same "
        "tokenizer (a catalogue name or a path, e.g. draft:qwen2.5-coder-0.5b for "
        "qwen2.5-coder-1.5b); the model verifies them in one forward; greedy and seeded "
        "outputs unchanged, sampled ones from the model's distribution; drafts only where the "
        "measured acceptance pays for them at the step's batch size (default: off)",
        engine="speculative",
        metavar="{off,ngram,draft:NAME}",
    ),
    Option(
        "num_speculative_tokens",
        int,
        "most draft tokens per step and request under --speculative (default: 4); a request "
        'may ask for fewer with llama-server\'s "speculative.n_max" (OpenAI, Responses, /ws and '
        "KServe bodies)",
        engine="num_speculative_tokens",
    ),
    Option(
        "speculative_max_num_seqs",
        int,
        "speculate only in steps of at most this many running requests: larger batches are "
        "compute-bound, where drafts cost what they could save (default: 4)",
        engine="speculative_max_num_seqs",
    ),
    Option(
        "engine_in_process",
        bool,
        "run the engine core on a thread of the server process, not in a process of its own "
        "(slower when busy: the HTTP side and the model then share one GIL)",
    ),
    # Hidden: tests shorten it; proxies' idle timeouts are what the default is for.
    Option("keep_alive_interval", float, argparse.SUPPRESS, server="keep_alive_interval_s"),
    # Serve drains a replica with its own graceful_shutdown_timeout_s.
    Option(
        "shutdown_grace",
        float,
        "seconds streams may run on after SIGINT/SIGTERM",
        server="shutdown_grace_s",
        on_ray=False,
    ),
    *(
        Option(f"default_{name}", kind, server=f"default_{name}", metavar="X", group=SAMPLING)
        for name, kind in (
            ("temperature", float),
            ("top_p", float),
            ("top_k", int),
            ("min_p", float),
            ("repetition_penalty", float),
        )
    ),
    Option(
        "log_level", default="info", choices=("debug", "info", "warning", "error"), on_ray=False
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`SERVE_OPTIONS` to ``parser``, grouped as declared."""
    groups = {title: parser.add_argument_group(title, text) for title, text in GROUPS.items()}
    for option in SERVE_OPTIONS:
        where = groups[option.group] if option.group else parser
        if option.type is bool:
            where.add_argument(option.flag, action="store_true", help=option.help)
            continue
        where.add_argument(
            option.flag,
            type=option.type,
            default=option.default,
            help=option.help,
            choices=option.choices,
            metavar=option.metavar,
        )


def configs_of(options: Mapping[str, Any], **server: Any) -> tuple[EngineConfig, ServerConfig]:
    """The engine's and the server's configuration from ``rillet serve``'s options by name
    (``vars()`` of the parsed command line, or the Ray builder's arguments dumped); names
    that are no option are passed over, and an option left out keeps its config's default.
    ``server`` sets ServerConfig fields only the caller knows (where to listen)."""
    engine_fields: dict[str, Any] = {}
    server_fields: dict[str, Any] = {}
    for option in SERVE_OPTIONS:
        if option.name not in options:
            continue
        value = options[option.name]
        if value is not None and option.to_config is not None:
            value = option.to_config(value)
        if option.engine is not None:
            engine_fields[option.engine] = value
        if option.server is not None:
            server_fields[option.server] = value
    # from_env passes over the Nones: the engine's defaults, or RILLET_MODEL & co., stand.
    return EngineConfig.from_env(**engine_fields), ServerConfig(**(server_fields | server))
