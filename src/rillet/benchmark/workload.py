"""What a benchmark run sends: its settings, the prompt set and the request bodies."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: Open-ended tasks, so a model with ``ignore_eos`` unsupported still tends to write long
#: answers. Request ``i`` of every level gets ``PROMPTS[i % len(PROMPTS)]``: two runs with
#: the same settings send the same bodies in the same order.
PROMPTS: tuple[str, ...] = (
    "Tell the story of a river from its source in the mountains to the sea, in detail.",
    "Explain how a compiler turns source code into machine code, stage by stage.",
    "Describe a day in the life of a medieval blacksmith, from dawn to night.",
    "Write a long guide to caring for houseplants through the four seasons.",
    "Explain why the sky is blue and sunsets are red, with the physics behind it.",
    "Write a detailed account of how a city builds and maintains its water supply.",
    "Describe how bees find flowers, make honey and organise their hive.",
    "Write a long letter from a sailor crossing the Atlantic in the 1800s.",
    "Explain how public-key cryptography lets two strangers share a secret.",
    "Describe the geology of volcanoes and what happens before an eruption.",
    "Write a step-by-step tutorial on making fresh pasta by hand.",
    "Explain how a jet engine works, from the intake to the exhaust.",
    "Tell a long story about two friends who open a bookshop in a small town.",
    "Describe how glaciers form, move and shape the valleys below them.",
    "Explain the main ideas of probability to a curious teenager, with examples.",
    "Write a detailed history of the bicycle and how it changed cities.",
    "Describe how an orchestra prepares a new symphony for its first concert.",
    "Explain how the immune system tells friend from foe, in a long answer.",
    "Write a long travel diary of a week spent walking along a coastal path.",
    "Describe the life of a tree over five hundred years in the same forest.",
    "Explain how electricity gets from a power station to a light bulb at home.",
    "Write an extended fable about a fox who learns to keep promises.",
    "Describe how mapmakers measured the Earth before satellites existed.",
    "Explain how a database keeps data safe when the power fails mid-write.",
)

#: The latency targets ``--goodput`` takes, in milliseconds.
GOODPUT_METRICS: tuple[str, ...] = ("ttft", "itl", "tpot", "e2el")


@dataclass(frozen=True)
class Prompt:
    """What one request asks: a conversation, and its own output length when it has one.

    ``max_tokens`` None means the run's ``--max-tokens`` (a dataset's prompts carry the
    length of the answer the conversation really got, as ``vllm bench serve`` sends them).
    """

    messages: tuple[Mapping[str, str], ...]
    max_tokens: int | None = None

    @classmethod
    def user(cls, text: str) -> Prompt:
        return cls(({"role": "user", "content": text},))

    def text(self) -> str:
        """The conversation as one completions prompt: the last message alone when it is the
        only one, else each turn on its own line after its role."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in self.messages]
        return "\n\n".join([*turns, "Assistant:"])


#: ``chat`` and ``completions`` stream SSE from the OpenAI routes; ``grpc`` streams the same
#: chat prompts over Triton's gRPC ``ModelStreamInfer`` (to ``grpc_target``).
Api = Literal["chat", "completions", "grpc"]


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one run; ``validate()`` before use (the CLI does).

    ``url`` is the server's base URL (a trailing ``/v1`` is accepted). Every level runs
    ``requests_for(c)`` requests with ``c`` in flight at all times (closed loop). A request
    gives up after ``request_timeout`` s; a level stops starting requests and cancels those
    in flight after ``level_timeout`` s, so a run lasts at most about
    ``warmup * request_timeout + len(concurrency) * level_timeout`` s.
    """

    url: str
    model: str
    api: Api = "chat"
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    max_tokens: int = 128
    requests_per_level: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    include_usage: bool = True
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    request_timeout: float = 300.0
    level_timeout: float = 300.0
    warmup: int = 1
    keepalive: bool = True
    api_key: str | None = None
    label: str = ""
    server_pid: int | None = None
    grpc_target: str = "127.0.0.1:8001"
    #: The prompt of request ``i`` (``long_prompts.PromptSet``, ``dataset.Conversations``);
    #: None: the built-in PROMPTS.
    prompts: Callable[[int], str | Prompt] | None = field(default=None, compare=False)
    #: Open loop: a level per rate (requests/s, Poisson arrivals) instead of per concurrency;
    #: ``concurrency`` then holds one cap on requests in flight (as vLLM's --max-concurrency).
    request_rates: tuple[float, ...] = ()
    #: Latency targets in ms a request must all meet to count towards goodput (``ttft``,
    #: ``itl``: the request's p99 gap, ``tpot``, ``e2el``: its whole latency).
    goodput: Mapping[str, float] = field(default_factory=dict)
    #: Seeds the open loop's arrival times: two runs send at the same offsets.
    seed: int = 0
    #: OpenAI's ``response_format`` sent with every request (``benchmark.constraint``);
    #: ``ignore_eos`` is then left out.
    response_format: Mapping[str, Any] | None = None
    #: Ask rillet for its per-event timing (``X-Rillet-Timing: 1``; ``timing`` over gRPC)
    #: and split each request's TTFT into queue, prefill, server and network.
    server_timing: bool = False

    def validate(self) -> None:
        """Raise ValueError on settings that cannot give a meaningful run."""
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {self.url!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be positive integers")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if self.requests_per_level is not None and self.requests_per_level < 1:
            raise ValueError("--requests-per-level must be at least 1")
        if self.request_timeout <= 0 or self.level_timeout <= 0:
            raise ValueError("time caps must be positive")
        if self.warmup < 0:
            raise ValueError("--warmup cannot be negative")
        if any(not rate > 0 for rate in self.request_rates):
            raise ValueError("--request-rate levels must be positive numbers")
        if self.request_rates and len(self.concurrency) != 1:
            raise ValueError("with --request-rate, --concurrency is one cap on requests in flight")
        unknown = set(self.goodput) - set(GOODPUT_METRICS)
        if unknown:
            raise ValueError(f"--goodput knows {', '.join(GOODPUT_METRICS)}; not {sorted(unknown)}")
        if any(not target > 0 for target in self.goodput.values()):
            raise ValueError("--goodput targets must be positive milliseconds")
        if self.response_format is not None and self.api == "grpc":
            raise ValueError("--response-format needs --api chat or completions")

    @property
    def levels(self) -> Sequence[float]:
        """What each level varies: request rates in an open loop, else concurrencies."""
        return self.request_rates or self.concurrency

    @property
    def base_url(self) -> str:
        base = self.url.rstrip("/")
        return base.removesuffix("/v1")

    @property
    def endpoint(self) -> str:
        if self.api == "grpc":
            return f"grpc://{self.grpc_target} (ModelStreamInfer)"
        route = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return self.base_url + route

    @property
    def name(self) -> str:
        """The label written into every JSON line."""
        if self.label:
            return self.label
        where = f"grpc {self.grpc_target}" if self.api == "grpc" else self.base_url
        return f"{where} {self.model}"

    def requests_for(self, level: float) -> int:
        """Requests sent at one level: enough for the loop to reach its steady state (a
        closed loop's concurrency), or about a minute of arrivals (an open loop's rate)."""
        if self.requests_per_level is not None:
            return self.requests_per_level
        if self.request_rates:
            return max(16, round(60 * level))
        return max(8, 4 * int(level))

    def prompt(self, index: int) -> Prompt:
        if self.prompts is None:
            return Prompt.user(PROMPTS[index % len(PROMPTS)])
        prompt = self.prompts(index)
        return Prompt.user(prompt) if isinstance(prompt, str) else prompt

    def max_tokens_of(self, prompt: Prompt) -> int:
        """What ``prompt`` asks for: its own length (a dataset's answer), else the run's."""
        return prompt.max_tokens or self.max_tokens

    def sampling(self, prompt: Prompt) -> dict[str, Any]:
        """The sampling fields of one request; ``extra_body`` wins over ours."""
        fields: dict[str, Any] = {
            "max_tokens": self.max_tokens_of(prompt),
            "temperature": self.temperature,
        }
        if self.response_format is not None:
            fields["response_format"] = dict(self.response_format)
        elif self.ignore_eos:
            fields["ignore_eos"] = True  # vLLM's extra, honoured by rillet; others ignore it
        return {**fields, **self.extra_body}

    def body(self, prompt: Prompt) -> dict[str, Any]:
        """The JSON body of one streaming request; ``extra_body`` wins over our fields."""
        body: dict[str, Any] = {"model": self.model, "stream": True}
        if self.api == "chat":
            body["messages"] = [dict(m) for m in prompt.messages]
        else:
            body["prompt"] = prompt.text()
        if self.include_usage:
            # The only reliable token count when a server merges tokens into one delta.
            body["stream_options"] = {"include_usage": True}
        body.update(self.sampling(prompt))
        return body

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.server_timing:
            headers["X-Rillet-Timing"] = "1"
        return headers
