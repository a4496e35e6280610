"""Speculation judged by what it makes: committed tokens a second in steps that speculate
against steps that do not, per batch size, from the engine's own step timings.

The acceptance rule (``engine/speculation.py``) predicts whether a draft pays from a cost
model: a verification row's share of a step and a draft forward's. The prediction can be
wrong, and was: Qwen2.5-Coder-0.5B drafting for the 1.5B at c = 1 on chat made 0.90x the
tokens a second of no speculation, at 62 % acceptance, while the rule kept drafting on
short runs of agreement (bench/RESULTS.md, issue 30's chat runs). :class:`StepRates` checks
the prediction against the clock: it keeps, per batch size, decayed sums of committed
tokens and seconds of the steps with drafts and of the steps without, and lets a step
draft only while drafting steps make more tokens a second than plain ones by ``margin``.

While drafting loses, a *probe* step every ``probe_steps`` steps drafts anyway, so a
workload that starts paying (a chat that turns into code repeating the prompt) brings it
back; each probe that leaves drafting off doubles the wait, up to ``max_probe_steps``, so
a draft that never pays costs at most one probe step in that many. A probe also waits long
enough that what it cost beyond a plain step stays within ``probe_budget`` of the time: a
draft model's probe first catches up on every token since its last forward (a whole prompt,
for a request it has not drafted for), many plain steps' worth, and with probes spaced by
the doubling alone the 0.5B drafting Qwen2.5-Coder-1.5B on chat at c = 1 still ran at ~0.88x
of no speculation (bench/RESULTS.md); an n-gram probe costs only its verification rows
(0.11-0.27 of a step each, bench/verify_step.py). While drafting wins,
every ``refresh_steps`` steps one step is kept plain, so the plain rate it is compared with
follows the context's growth (a plain step at 3,000 tokens is slower than at 100).

What is compared is steps of decode rows only (a prompt chunk's time says nothing about
drafting), at one batch size (``B`` rows make ``B`` tokens a plain step; a step's time
grows with ``B``). Per request there is no clock: the rows of a step share its forward, so
the per-request part stays the acceptance rule, and this gate sits above it.

No torch, no clock here: the engine measures and calls :meth:`StepRates.observe`; tests
feed it synthetic timings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Rate:
    """Decayed sums of committed tokens and seconds over some steps."""

    tokens: float = 0.0
    seconds: float = 0.0
    count: int = 0  # steps observed (not decayed)
    last_step: int = 0  # the gate's step count at the latest observation

    def add(self, tokens: int, seconds: float, decay: float, step: int) -> None:
        self.tokens = decay * self.tokens + tokens
        self.seconds = decay * self.seconds + seconds
        self.count += 1
        self.last_step = step

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RateGateConfig:
    """How :class:`StepRates` judges (defaults: see each field)."""

    #: Drafting steps must make this much more a second than plain ones (noise margin).
    margin: float = 0.03
    #: Steps of each kind seen at a batch size before it is judged.
    min_samples: int = 3
    #: Weight the past keeps at each drafting step: 0.7 lets one probe of a copied passage
    #: (4-5 tokens a step) outweigh a history of chat drafts (~1.6).
    spec_decay: float = 0.7
    #: Weight the past keeps at each plain step (plain steps vary less).
    plain_decay: float = 0.9
    #: The first probe's wait, in steps, after drafting was judged to lose; it doubles.
    probe_steps: int = 32
    max_probe_steps: int = 512
    #: A probe's cost beyond a plain step (catch-up included) is at most this share of the
    #: time until the next probe.
    probe_budget: float = 0.02
    #: While drafting wins, one plain step this often refreshes the plain rate.
    refresh_steps: int = 256
    #: Drafting steps ignored at the start: a fresh draft model's first forwards fault its
    #: weights in (3-5x slower, bench/draft_cost.py).
    warmup_steps: int = 4


class StepRates:
    """Per batch size: do steps with drafts make more tokens a second than steps without?"""

    def __init__(self, config: RateGateConfig | None = None) -> None:
        self.config = config or RateGateConfig()
        self._plain: dict[int, _Rate] = {}
        self._spec: dict[int, _Rate] = {}
        self._step = 0
        self._num_spec_seen = 0
        self._probe_wait = self.config.probe_steps
        self._next_probe = 0
        #: Whether the latest :meth:`allows` was a probe (the step should draft at least one).
        self.probing = False
        #: Steps the gate allowed to draft, kept plain, and probed (statistics).
        self.num_allowed = 0
        self.num_refused = 0
        self.num_probes = 0

    def observe(
        self,
        batch: int,
        num_drafts: int,
        num_tokens: int,
        seconds: float,
        catch_up_seconds: float = 0.0,
    ) -> None:
        """Record a step of ``batch`` decode rows that verified ``num_drafts`` drafts,
        committed ``num_tokens`` tokens, and took ``seconds`` besides ``catch_up_seconds``
        of a draft model catching up on tokens it had not seen (a cost of having paused, not
        of drafting: left out of the rates, charged to the probe that paid it)."""
        if batch <= 0 or seconds <= 0:
            return
        cfg = self.config
        if self.probing:
            self._space_probe(batch, seconds + catch_up_seconds)
        if num_drafts == 0:
            self._plain.setdefault(batch, _Rate()).add(
                num_tokens, seconds, cfg.plain_decay, self._step
            )
            return
        self._num_spec_seen += 1
        if self._num_spec_seen > cfg.warmup_steps:
            self._spec.setdefault(batch, _Rate()).add(
                num_tokens, seconds, cfg.spec_decay, self._step
            )

    def ratio(self, batch: int) -> float | None:
        """Drafting steps' tokens a second over plain steps', at ``batch`` rows (None: not
        yet judged)."""
        cfg = self.config
        plain, spec = self._plain.get(batch), self._spec.get(batch)
        if plain is None or spec is None:
            return None
        if plain.count < cfg.min_samples or spec.count < cfg.min_samples:
            return None
        return spec.per_second / plain.per_second if plain.per_second > 0 else None

    def allows(self, batch: int) -> bool:
        """Whether this step (of ``batch`` running requests) may draft. Call once a step."""
        cfg = self.config
        self._step += 1
        self.probing = False
        spec = self._spec.get(batch)
        if spec is None or spec.count < cfg.min_samples:
            self._next_probe = self._step + cfg.probe_steps
            return self._allow()  # not judged yet: the acceptance rule alone decides
        plain = self._plain.get(batch)
        if plain is None or plain.count < cfg.min_samples:
            self._next_probe = self._step + cfg.probe_steps
            return self._refuse()  # a plain step to compare with
        ratio = self.ratio(batch)
        if ratio is not None and ratio > 1 + cfg.margin:
            self._probe_wait = cfg.probe_steps
            self._next_probe = self._step + cfg.probe_steps
            if self._step - plain.last_step > cfg.refresh_steps:
                return self._refuse()
            return self._allow()
        if self._step < self._next_probe:
            return self._refuse()
        # A probe; if drafting still loses after it, the next one waits twice as long.
        self._next_probe = self._step + self._probe_wait
        self._probe_wait = min(2 * self._probe_wait, cfg.max_probe_steps)
        self.probing = True
        self.num_probes += 1
        return self._allow()

    def _space_probe(self, batch: int, seconds: float) -> None:
        """Push the next probe back so that this one's cost beyond a plain step is at most
        ``probe_budget`` of the time until then."""
        plain = self._plain.get(batch)
        if plain is None or plain.per_second <= 0:
            return
        plain_step = batch / plain.per_second
        extra = seconds - plain_step
        if extra > 0:
            wait = math.ceil(extra / (self.config.probe_budget * plain_step))
            self._next_probe = max(self._next_probe, self._step + wait)

    def _allow(self) -> bool:
        self.num_allowed += 1
        return True

    def _refuse(self) -> bool:
        self.num_refused += 1
        return False
