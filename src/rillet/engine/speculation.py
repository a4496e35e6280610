"""Speculative decoding's proposer and policy: which rows get draft tokens, and how many.

A proposer guesses the next tokens of a request; the scheduler schedules them after the
request's last token as one row of ``1 + k`` query tokens; the model runner scores every
position in that one forward; the scheduler keeps the longest prefix of drafts the target
agrees with plus the target's own next token, and the block manager gives back the slots
of the rest. So a step still yields at least one token per row, and the output is the
target's greedy output whatever the drafts were.

Only plain greedy rows speculate: temperature 0, no penalties (they depend on the tokens
before each position), no grammar (its mask follows committed tokens only), past
``min_tokens`` (whose suppression depends on the count). Every other row decodes as before.

Policy, per step and per request, so speculation never makes a loaded engine slower:
a step speculates only while the running batch is at most ``max_num_seqs`` requests (a
decode step of a few rows is memory-bound: scoring k more tokens per row costs little,
while a large batch is compute-bound and every draft token costs a full token's work);
a request whose measured acceptance falls below ``min_acceptance`` stops proposing for a
while and then probes again (acceptance changes along a generation: a copied passage ends,
another begins).

No torch here: this runs inside the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rillet.config import SPECULATIVE_METHODS
from rillet.engine.request import Request


@dataclass(frozen=True)
class SpeculationConfig:
    """How the scheduler speculates. ``method="off"`` (or k = 0) never does."""

    method: str = "off"
    num_speculative_tokens: int = 4
    #: Longest and shortest n-gram the proposer matches (longest first).
    max_ngram: int = 4
    min_ngram: int = 2
    #: Speculate only in steps whose running batch is at most this many requests.
    max_num_seqs: int = 4
    #: A request whose accepted / proposed ratio (a moving average) drops below this stops
    #: proposing for ``cooldown_steps`` steps.
    min_acceptance: float = 0.25
    cooldown_steps: int = 16

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.num_speculative_tokens > 0


class NgramIndex:
    """Prompt lookup for one request: where each n-gram last occurred, kept incrementally.

    ``_next[n][gram]`` is the position right after the most recent occurrence of ``gram``
    that ends before the request's last token, so the lookup of the current suffix never
    finds itself. Each new token adds one entry per n: O(n) per token, not a scan.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self._sizes = range(max_n, min_n - 1, -1)
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}
        self._num_indexed = 0  # positions p whose preceding n-grams are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
        suffix of ``tokens`` found (``[]`` when none is)."""
        # Index every position up to the last token: the gram ending at p - 1 maps to p.
        last = len(tokens) - 1
        for p in range(max(self._num_indexed, 1), last + 1):
            for n in self._sizes:
                if p >= n:
                    self._next[n][tuple(tokens[p - n : p])] = p
        self._num_indexed = max(self._num_indexed, last + 1)
        for n in self._sizes:
            if len(tokens) <= n:
                continue
            start = self._next[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + k]
        return []


@dataclass
class _RequestStats:
    index: NgramIndex
    acceptance: float = 1.0  # optimistic: a new request gets to try
    cooldown: int = 0


@dataclass
class SpeculationCounters:
    """Monotonic counters since start, per proposer (``/metrics`` reads them)."""

    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    num_accepted_tokens: dict[str, int] = field(default_factory=dict)


class Speculator:
    """Proposes draft tokens for eligible rows and learns each request's acceptance."""

    #: Weight of the latest step in a request's acceptance average.
    _ALPHA = 0.3

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.counters = SpeculationCounters({config.method: 0}, {config.method: 0})
        self._requests: dict[str, _RequestStats] = {}

    def step_allows(self, num_running: int) -> bool:
        """Whether a step of ``num_running`` requests speculates at all."""
        return self.config.enabled and num_running <= self.config.max_num_seqs

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        """Draft tokens for ``request``'s next step, at most ``max_tokens`` (may be [])."""
        cfg = self.config
        k = min(cfg.num_speculative_tokens, max_tokens)
        if k <= 0 or not _eligible(request):
            return []
        stats = self._requests.get(request.request_id)
        if stats is None:
            stats = _RequestStats(NgramIndex(cfg.min_ngram, cfg.max_ngram))
            self._requests[request.request_id] = stats
        if stats.cooldown > 0:
            stats.cooldown -= 1
            if stats.cooldown == 0:
                stats.acceptance = cfg.min_acceptance  # probe again, on probation
            return []
        return stats.index.propose(request.all_token_ids, k)

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Record one verification: ``num_accepted`` of ``num_drafts`` drafts agreed."""
        method = self.config.method
        c = self.counters
        c.num_draft_tokens[method] = c.num_draft_tokens.get(method, 0) + num_drafts
        c.num_accepted_tokens[method] = c.num_accepted_tokens.get(method, 0) + num_accepted
        stats = self._requests.get(request_id)
        if stats is None or num_drafts == 0:
            return
        rate = num_accepted / num_drafts
        stats.acceptance += self._ALPHA * (rate - stats.acceptance)
        if stats.acceptance < self.config.min_acceptance:
            stats.cooldown = self.config.cooldown_steps

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)


def _eligible(request: Request) -> bool:
    """Rows whose next-token choice is a pure argmax of the raw logits at each position."""
    p = request.params
    return (
        p.is_greedy
        and p.constraint is None
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and request.num_output_tokens >= p.min_tokens
    )
