"""Speculative decoding's proposers and policy: which rows get draft tokens, and how many.

A proposer guesses the next tokens of a request; the scheduler schedules them after the
request's last token as one row of ``1 + k`` query tokens; the model runner scores every
position in that one forward; the scheduler keeps the longest prefix of drafts the target
agrees with plus the target's own next token, and the block manager gives back the slots
of the rest. So a step still yields at least one token per row, and the output is the
target's greedy output whatever the drafts were.

Two proposers. Prompt lookup (``ngram``, :class:`NgramIndex`) runs here, in the scheduler:
its drafts are known when the row is scheduled. A draft model (``draft:NAME``) runs in the
model runner (``engine/draft_model.py``), which owns torch: the scheduler reserves ``k``
draft slots (``ScheduledRequest.num_pending_drafts``) and the draft model fills them in the
same step, before the target's forward. Either way this module decides ``k``.

Rows speculate when their next-token choice at each position depends only on that
position's logits: no penalties (they depend on the tokens before each position), no
grammar (its mask follows committed tokens only), past ``min_tokens`` (whose suppression
depends on the count). Greedy rows keep the drafts the argmax agrees with; sampled rows
draw each position as they would without drafts and keep the drafts the draw agrees with,
which is rejection sampling for a deterministic draft (``engine/model_runner.py``). Both
proposers are deterministic given the tokens so far (the draft model drafts its argmax),
so a draft is a point-mass proposal q = 1[x = d]: accepting it with probability
min(1, p(d) / q(d)) = p(d) and otherwise drawing from p with d removed is exactly "draw from
p, keep d if the draw is d", and the output follows the target's distribution.

Policy (``SpeculationConfig``), per step and per request, so speculation never makes a
loaded engine slower. A request's acceptance ``a`` is the chance a draft is accepted given
the ones before it were: accepted / (accepted + first rejections), decayed so it follows
the generation (a copied passage ends, another begins). With ``k`` drafts at ``a`` a row
yields ``1 + a + ... + a^k`` tokens a step, while the step makes about ``B`` tokens (``B``
decode rows). Draft ``i`` adds ``a^i`` tokens for its cost ``c`` (a fraction of a decode
step's time), so it pays when ``a^i > c * B``. Its cost:

- its verification row: ``row_cost(n) = row_cost + row_cost_per_1k * n / 1000`` at a
  context of ``n`` tokens (bench/verify_step.py, bundled model, k = 4: 0.11 of a decode
  step at 128 tokens, 0.27 at 3,000: decode attention over a long context is compute, not
  reads, so a row's share grows with it);
- with a draft model, one draft-model forward per draft token as well: ``draft_cost``, a
  draft forward's time as a fraction of the target's decode step. It starts at the ratio of
  the two models' weight bytes (what a memory-bound decode step reads: 0.44 for
  Qwen2.5-Coder 0.5B drafting for 1.5B) and then follows what the engine measures
  (:meth:`Speculator.observe_draft_forwards`), so a draft model slower than its bytes say
  stops being used. Conservatively the whole forward is charged to each request, though one
  forward serves every row of the step.

So draft ``i`` is proposed while ``a^i > (row_cost(n) + draft_cost) * B``. A request gets
the longest run of drafts that pays; a step's rows stay within ``max_step_rows`` (past
that, a CPU step stops being bound by reading the weights and every row costs nearly a full
token) and speculates only while at most ``max_num_seqs`` requests run. A request whose
first draft does not pay stops proposing and probes with one draft every ``cooldown_steps``
steps. A request may ask for fewer drafts than ``num_speculative_tokens``
(``SamplingParams.num_speculative_tokens``; 0 turns speculation off for it).

Above that rule, per batch size, sits the clock (``engine/spec_rates.py``): the engine
reports every step of decode rows (:meth:`Speculator.observe_step`), and a step drafts only
while drafting steps have made more committed tokens a second than plain steps at the same
batch size, with a probe step now and then (waits doubling while drafting keeps losing) so
drafting comes back when the text turns repetitive. The cost model says which requests and
how many drafts; the measured rates say whether drafting pays at all.

No torch here: this runs inside the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rillet.config import SPECULATIVE_METHODS, draft_model_of
from rillet.engine.request import Request
from rillet.engine.spec_rates import RateGateConfig, StepRates


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
    #: What one more row adds to a decode step's time, as a fraction of it, at a context of
    #: ``n`` tokens: ``row_cost + row_cost_per_1k * n / 1000`` (0.11 at 128 tokens and 0.27
    #: at 3,000, measured by bench/verify_step.py on the bundled model).
    row_cost: float = 0.10
    row_cost_per_1k: float = 0.056
    #: A draft-model forward's time as a fraction of a target decode step (0: no draft model).
    draft_cost: float = 0.0
    #: A request whose first draft does not pay probes with one draft this often.
    cooldown_steps: int = 16
    #: Judge drafting by measured step rates too (``engine/spec_rates.py``); off for tests
    #: that need drafts whatever the clock says.
    judge_by_rates: bool = True
    rate_gate: RateGateConfig = field(default_factory=RateGateConfig)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS and not draft_model_of(self.method):
            raise ValueError(
                f"speculative must be one of {', '.join(SPECULATIVE_METHODS)} or draft:NAME"
            )
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.num_speculative_tokens > 0

    @property
    def uses_draft_model(self) -> bool:
        """Whether the drafts come from a draft model in the runner, not from here."""
        return draft_model_of(self.method) is not None

    @property
    def proposer(self) -> str:
        """The proposer's name in counters and metrics: ``ngram`` or ``draft``."""
        return "draft" if self.uses_draft_model else self.method

    def row_cost_at(self, context_len: int) -> float:
        """What one verification row costs, as a fraction of a decode step, at
        ``context_len`` tokens of context."""
        return self.row_cost + self.row_cost_per_1k * context_len / 1000


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


@dataclass(frozen=True)
class DraftTiming:
    """A draft model's seconds over some steps: all its forwards', and the count and
    seconds of its decode-like ones (what a draft costs; not a first prompt's catch-up)."""

    seconds: float
    num_decode_forwards: int
    decode_seconds: float


@dataclass
class SpeculationCounters:
    """Monotonic counters since start, per proposer (``/metrics`` reads them)."""

    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    num_accepted_tokens: dict[str, int] = field(default_factory=dict)


class Speculator:
    """Proposes draft tokens for eligible rows and learns each request's acceptance."""

    #: Weight kept by the past at each verification (about the last 5 count).
    _DECAY = 0.8
    #: Measured draft costs ignored at the start (see observe_draft_forwards).
    _WARMUP_OBSERVATIONS = 8

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        name = config.proposer
        self.counters = SpeculationCounters({name: 0}, {name: 0})
        self._requests: dict[str, _RequestStats] = {}
        #: A draft-model forward's time as a fraction of a decode step: the configured prior,
        #: then a moving average of the measured ratio.
        self.draft_cost = config.draft_cost
        self._num_cost_observations = 0
        self._batch = 0
        self._rows_left = 0
        #: Committed tokens a second of drafting steps against plain ones, per batch size.
        self.rates = StepRates(config.rate_gate)

    @property
    def drafts_in_runner(self) -> bool:
        """True when the model runner fills the drafts (a draft model): the scheduler then
        asks :meth:`num_to_draft` for a count, not :meth:`propose` for tokens."""
        return self.config.uses_draft_model

    def step_allows(self, num_running: int) -> bool:
        """Whether a step of ``num_running`` requests speculates at all; if so, starts the
        step's budget (every running request counts as one decode row)."""
        cfg = self.config
        if not (cfg.enabled and num_running <= cfg.max_num_seqs):
            return False
        if cfg.judge_by_rates and not self.rates.allows(num_running):
            return False
        self._batch = num_running
        self._rows_left = cfg.max_step_rows - num_running
        return self._rows_left > 0

    def num_worth_proposing(self, acceptance: float, limit: int, context_len: int = 0) -> int:
        """The longest run of drafts, at most ``limit``, whose every draft pays this step at
        a context of ``context_len`` tokens."""
        threshold = (self.config.row_cost_at(context_len) + self.draft_cost) * self._batch
        k, chance = 0, acceptance
        while k < limit and chance > threshold:
            k += 1
            chance *= acceptance
        return k

    def _plan(self, request: Request, max_tokens: int) -> tuple[_RequestStats, int] | None:
        """The request's stats and how many drafts it gets this step (None: none)."""
        cfg = self.config
        wanted = request.params.num_speculative_tokens
        limit = min(cfg.num_speculative_tokens, max_tokens, self._rows_left)
        if wanted is not None:
            limit = min(limit, wanted)
        if limit <= 0 or not _eligible(request):
            return None
        stats = self._requests.get(request.request_id)
        if stats is None:
            stats = _RequestStats(NgramIndex(cfg.min_ngram, cfg.max_ngram))
            self._requests[request.request_id] = stats
        k = self.num_worth_proposing(stats.acceptance, limit, request.num_tokens)
        if k == 0 and cfg.judge_by_rates and self.rates.probing:
            k = 1  # the step probes whether drafting pays again: every row tries a draft
        elif k == 0:
            stats.idle_steps += 1
            if stats.idle_steps < cfg.cooldown_steps:
                return None
            k = 1  # a probe: has this request started agreeing again?
        return stats, k

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        """Draft tokens for ``request``'s next step by prompt lookup, at most ``max_tokens``
        (may be []). Call after :meth:`step_allows` said the step speculates."""
        plan = self._plan(request, max_tokens)
        if plan is None:
            return []
        stats, k = plan
        drafts = stats.index.propose(request.all_token_ids, k)
        if drafts:
            stats.idle_steps = 0
            self._rows_left -= len(drafts)
        return drafts

    def num_to_draft(self, request: Request, max_tokens: int) -> int:
        """How many draft slots ``request`` gets this step for the runner's draft model to
        fill, at most ``max_tokens`` (0: none). Call after :meth:`step_allows`."""
        plan = self._plan(request, max_tokens)
        if plan is None:
            return 0
        stats, k = plan
        stats.idle_steps = 0
        self._rows_left -= k
        return k

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Record one verification: ``num_accepted`` of ``num_drafts`` drafts agreed."""
        name = self.config.proposer
        c = self.counters
        c.num_draft_tokens[name] = c.num_draft_tokens.get(name, 0) + num_drafts
        c.num_accepted_tokens[name] = c.num_accepted_tokens.get(name, 0) + num_accepted
        stats = self._requests.get(request_id)
        if stats is None or num_drafts == 0:
            return
        judged = num_accepted + (num_accepted < num_drafts)
        stats.accepted = self._DECAY * stats.accepted + num_accepted
        stats.judged = self._DECAY * stats.judged + judged

    def observe_step(
        self,
        batch: int,
        num_drafts: int,
        num_tokens: int,
        seconds: float,
        catch_up_seconds: float = 0.0,
    ) -> None:
        """Record a step of ``batch`` decode rows (no prompt chunk) that verified
        ``num_drafts`` drafts and committed ``num_tokens`` tokens in ``seconds``, besides
        ``catch_up_seconds`` of a draft model's catch-up on unseen tokens (:class:`StepRates`)."""
        self.rates.observe(batch, num_drafts, num_tokens, seconds, catch_up_seconds)

    def observe_draft_forwards(
        self, seconds_per_forward: float, verify_seconds: float, num_drafts: int, context_len: int
    ) -> None:
        """Record a step's measured costs: the draft model's decode-like forwards took
        ``seconds_per_forward`` each, and the target's verifying forward ``verify_seconds``
        for ``num_drafts`` draft rows at a mean context of ``context_len`` tokens. A decode
        step is the verifying one less its draft rows (``row_cost_at``)."""
        decode = verify_seconds / (1 + self.config.row_cost_at(context_len) * num_drafts)
        self._num_cost_observations += 1
        # The first forwards of a fresh start fault the weights in from their mapping (3-5x
        # slower, bench/draft_cost.py): the prior stands until they are past.
        if decode > 0 and self._num_cost_observations > self._WARMUP_OBSERVATIONS:
            ratio = seconds_per_forward / decode
            self.draft_cost = self._DECAY * self.draft_cost + (1 - self._DECAY) * ratio

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
