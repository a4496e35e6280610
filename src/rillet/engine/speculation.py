"""Speculative decoding's proposer and policy: which rows get draft tokens, and how many.

A proposer guesses the next tokens of a request; the scheduler schedules them after the
request's last token as one row of ``1 + k`` query tokens; the model runner scores every
position in that one forward; the scheduler keeps the longest prefix of drafts the target
agrees with plus the target's own next token, and the block manager gives back the slots
of the rest. So a step still yields at least one token per row, and the output is the
target's greedy output whatever the drafts were.

Rows speculate when their next-token choice at each position depends only on that
position's logits: no penalties (they depend on the tokens before each position), no
grammar (its mask follows committed tokens only), past ``min_tokens`` (whose suppression
depends on the count). Greedy rows keep the drafts the argmax agrees with; sampled rows
draw each position as they would without drafts and keep the drafts the draw agrees with,
which is rejection sampling for a deterministic draft (``engine/model_runner.py``).

Policy (``SpeculationConfig``), per step and per request, so speculation never makes a
loaded engine slower. A request's acceptance ``a`` is the chance a draft is accepted given
the ones before it were: accepted / (accepted + first rejections), decayed so it follows
the generation (a copied passage ends, another begins). With ``k`` drafts at ``a`` a row
yields ``1 + a + ... + a^k`` tokens a step. Each draft row adds ``row_cost`` of a decode
step's time (bench/verify_step.py), while the step makes about ``B`` tokens (``B`` decode
rows), so draft ``i`` pays when ``a^i > row_cost * B``. A request gets the longest run of
drafts that pays; a step's rows stay within ``max_step_rows`` (past that, a CPU step stops
being bound by reading the weights and every row costs nearly a full token) and
speculates only while at most ``max_num_seqs`` requests run. A request whose first draft
does not pay stops proposing and probes with one draft every ``cooldown_steps`` steps.

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
    max_num_seqs: int = 8
    #: At most this many rows (decode rows plus drafts) in a speculating step.
    max_step_rows: int = 24
    #: What one more row adds to a decode step's time, as a fraction of it.
    row_cost: float = 0.03
    #: A request whose first draft does not pay probes with one draft this often.
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
    # Decayed counts: drafts accepted, and drafts judged (accepted + first rejections).
    # The prior (a = 0.8 over 1.25 judged drafts) lets a new request try a full run.
    accepted: float = 1.0
    judged: float = 1.25
    idle_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.judged


@dataclass
class SpeculationCounters:
    """Monotonic counters since start, per proposer (``/metrics`` reads them)."""

    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    num_accepted_tokens: dict[str, int] = field(default_factory=dict)


class Speculator:
    """Proposes draft tokens for eligible rows and learns each request's acceptance."""

    #: Weight kept by the past at each verification (about the last 5 count).
    _DECAY = 0.8

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.counters = SpeculationCounters({config.method: 0}, {config.method: 0})
        self._requests: dict[str, _RequestStats] = {}
        self._threshold = 0.0
        self._rows_left = 0

    def step_allows(self, num_running: int) -> bool:
        """Whether a step of ``num_running`` requests speculates at all; if so, starts the
        step's budget (every running request counts as one decode row)."""
        cfg = self.config
        if not (cfg.enabled and num_running <= cfg.max_num_seqs):
            return False
        self._threshold = cfg.row_cost * num_running
        self._rows_left = cfg.max_step_rows - num_running
        return self._rows_left > 0

    def num_worth_proposing(self, acceptance: float, limit: int) -> int:
        """The longest run of drafts, at most ``limit``, whose every draft pays this step."""
        k, chance = 0, acceptance
        while k < limit and chance > self._threshold:
            k += 1
            chance *= acceptance
        return k

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        """Draft tokens for ``request``'s next step, at most ``max_tokens`` (may be []).
        Call after :meth:`step_allows` said the step speculates."""
        cfg = self.config
        limit = min(cfg.num_speculative_tokens, max_tokens, self._rows_left)
        if limit <= 0 or not _eligible(request):
            return []
        stats = self._requests.get(request.request_id)
        if stats is None:
            stats = _RequestStats(NgramIndex(cfg.min_ngram, cfg.max_ngram))
            self._requests[request.request_id] = stats
        k = self.num_worth_proposing(stats.acceptance, limit)
        if k == 0:
            stats.idle_steps += 1
            if stats.idle_steps < cfg.cooldown_steps:
                return []
            k = 1  # a probe: has this request started copying again?
        drafts = stats.index.propose(request.all_token_ids, k)
        if drafts:
            stats.idle_steps = 0
            self._rows_left -= len(drafts)
        return drafts

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Record one verification: ``num_accepted`` of ``num_drafts`` drafts agreed."""
        method = self.config.method
        c = self.counters
        c.num_draft_tokens[method] = c.num_draft_tokens.get(method, 0) + num_drafts
        c.num_accepted_tokens[method] = c.num_accepted_tokens.get(method, 0) + num_accepted
        stats = self._requests.get(request_id)
        if stats is None or num_drafts == 0:
            return
        judged = num_accepted + (num_accepted < num_drafts)
        stats.accepted = self._DECAY * stats.accepted + num_accepted
        stats.judged = self._DECAY * stats.judged + judged

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)


def _eligible(request: Request) -> bool:
    """Rows whose next-token choice at each position depends on its logits alone."""
    p = request.params
    return (
        p.constraint is None
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and request.num_output_tokens >= p.min_tokens
    )
