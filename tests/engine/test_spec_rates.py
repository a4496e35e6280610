"""The rate gate of speculation (``engine/spec_rates.py``), on synthetic step timings: which
steps may draft, when it probes, and how it comes back. No clock: the timings are made up."""

from __future__ import annotations

import dataclasses
import itertools

from rillet.engine.spec_rates import RateGateConfig, StepRates
from rillet.engine.speculation import SpeculationConfig, Speculator
from scheduler_model import make_request

#: No warm-up, so the first drafting steps count.
CONFIG = RateGateConfig(warmup_steps=0)


def run(
    rates: StepRates,
    steps: int,
    *,
    batch: int = 1,
    spec: tuple[int, float] = (2, 1.5),
    plain_seconds: float = 1.0,
) -> list[bool]:
    """Drive ``steps`` steps: a step the gate allows drafts and makes ``spec`` = (tokens,
    seconds); one it refuses makes ``batch`` tokens in ``plain_seconds``. Returns the
    decisions in order."""
    decisions = []
    for _ in range(steps):
        allowed = rates.allows(batch)
        decisions.append(allowed)
        if allowed:
            rates.observe(batch, 2, spec[0], spec[1])
        else:
            rates.observe(batch, 0, batch, plain_seconds)
    return decisions


def test_drafting_that_wins_continues_with_a_plain_step_now_and_then() -> None:
    rates = StepRates(CONFIG)
    # Unjudged: the first min_samples drafting steps go ahead, then as many plain ones.
    assert run(rates, 6, spec=(4, 1.6)) == [True] * 3 + [False] * 3
    assert (rates.ratio(1) or 0) > 2  # 2.5 tokens a step-time
    decisions = run(rates, 600, spec=(4, 1.6))
    # One plain step every refresh_steps + 1 keeps the compared rate fresh.
    assert decisions.count(False) == 600 // (CONFIG.refresh_steps + 1)
    assert rates.num_probes == 0


def test_drafting_that_loses_stops_and_probes_ever_less_often() -> None:
    rates = StepRates(dataclasses.replace(CONFIG, probe_budget=1.0))  # the doubling alone
    # Chat with a slow draft model: 3 tokens for 3.2 plain steps' time (0.94x).
    decisions = run(rates, 6, spec=(3, 3.2))
    assert decisions == [True] * 3 + [False] * 3
    assert 0 < (rates.ratio(1) or 0) < 1
    decisions = run(rates, 2000, spec=(3, 3.2))
    probes = [i for i, allowed in enumerate(decisions) if allowed]
    waits = [b - a for a, b in itertools.pairwise(probes)]
    # Waits double from probe_steps up to max_probe_steps, then stay there.
    assert waits[:6] == [32, 64, 128, 256, 512, 512]
    assert set(waits[4:]) == {512}
    assert rates.num_probes == len(probes)


def test_a_probe_into_repetitive_text_brings_drafting_back() -> None:
    rates = StepRates(CONFIG)
    run(rates, 200, spec=(3, 3.2))  # drafting loses: probes only
    assert rates.num_probes >= 2
    # The text turns into a copied passage: a probe makes 5 tokens in 1.9 step-times.
    decisions = run(rates, 400, spec=(5, 1.9))
    first = decisions.index(True)
    assert first < 256  # the next probe comes within the current wait
    assert all(decisions[first : first + 100])  # and drafting stays on
    # ... and when it ends (drafts rejected: 1 token for 1.7 step-times), it stops again.
    decisions = run(rates, 50, spec=(1, 1.7))
    stop = decisions.index(False)
    assert stop <= 6 and not any(decisions[stop : stop + 30])


def test_a_costly_probe_pushes_the_next_one_back() -> None:
    """A draft model's probe catches up on the tokens since its last forward: the next
    probe waits until that cost is within probe_budget (2 %) of the time."""
    rates = StepRates(CONFIG)
    run(rates, 6, spec=(3, 3.2))  # judged: drafting loses
    waited = 0
    while not rates.allows(1):  # plain steps until the first probe
        rates.observe(1, 0, 1, 1.0)
        waited += 1
    assert rates.probing and waited == CONFIG.probe_steps - 1
    # The probe: 1 token in 1.7 s of drafting and 10 s of catch-up, against a 1 s plain step.
    rates.observe(1, 2, 1, 1.7, catch_up_seconds=10.0)
    decisions = run(rates, 1000, spec=(3, 3.2))
    # (1.7 + 10 - 1) / (0.02 * 1) = 535 steps, not the doubled wait (probe_steps, then 64).
    assert decisions.index(True) + 1 == 535


def test_batch_sizes_are_judged_apart() -> None:
    rates = StepRates(CONFIG)
    run(rates, 20, batch=1, spec=(4, 1.6))  # wins at one row
    run(rates, 20, batch=4, spec=(5, 1.6), plain_seconds=1.2)  # loses at four: 3.1 vs 3.3
    ratio_1, ratio_4 = rates.ratio(1), rates.ratio(4)
    assert ratio_1 is not None and ratio_4 is not None and ratio_4 < 1 < ratio_1
    assert rates.allows(1)
    assert rates.ratio(2) is None and rates.allows(2)  # unjudged: allowed


def test_margin_and_warm_up() -> None:
    # 2% better is inside the 3% margin: not drafting.
    rates = StepRates(CONFIG)
    run(rates, 6, spec=(102, 100.0))
    assert rates.ratio(1) is not None and not rates.allows(1)
    # A fresh draft model's first forwards are slow (here 5x): ignored.
    warm = StepRates(dataclasses.replace(CONFIG, warmup_steps=4))
    for _ in range(4):
        assert warm.allows(1)
        warm.observe(1, 2, 3, 7.5)
    assert warm.ratio(1) is None
    assert run(warm, 6, spec=(3, 1.5)) == [True] * 3 + [False] * 3
    assert (warm.ratio(1) or 0) > 1.9


def test_the_speculator_drafts_only_where_the_gate_allows() -> None:
    """Through ``Speculator``: a closed gate refuses the step, a probe gives every eligible
    row at least one draft, and ``judge_by_rates=False`` ignores the clock."""
    gate = dataclasses.replace(CONFIG, probe_steps=4)
    config = SpeculationConfig("ngram", 4, cooldown_steps=1000, row_cost=0.1, rate_gate=gate)
    spec = Speculator(config)
    r = make_request("a", [1, 2, 3, 1, 2], temperature=0.0)
    assert spec.step_allows(1) and spec.propose(r, 8) == [3, 1, 2]  # the prior: 0.8
    for _ in range(6):
        spec.observe("a", 3, 0)  # acceptance near 0: the acceptance rule says no drafts
    spec.observe_step(1, 3, 1, 2.0)
    allowed = [True]
    for _ in range(5):  # unjudged: 3 drafting steps (1 token in 2 s), then 3 plain (in 1 s)
        allowed.append(spec.step_allows(1))
        spec.observe_step(1, 2 if allowed[-1] else 0, 1, 2.0 if allowed[-1] else 1.0)
    assert allowed == [True] * 3 + [False] * 3
    allowed = [spec.step_allows(1) for _ in range(4)]
    assert allowed == [False, False, False, True]  # the 4th step probes
    assert spec.rates.probing and spec.propose(r, 8) == [3]
    unjudged = Speculator(dataclasses.replace(config, judge_by_rates=False))
    for _ in range(3):
        unjudged.observe_step(1, 2, 1, 2.0)
        unjudged.observe_step(1, 0, 1, 1.0)
    assert all(unjudged.step_allows(1) for _ in range(4))
