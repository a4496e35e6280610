"""The core's own speed measures: moving averages, 0.0 until a step is measured."""

from __future__ import annotations

import pytest

from rillet.engine.rates import ALPHA, EngineRates


def test_the_first_sample_is_the_average_then_it_moves_by_alpha() -> None:
    rates = EngineRates()
    assert (rates.prefill_tokens_per_s, rates.step_time_s) == (0.0, 0.0)
    rates.observe(100, 0.5)
    assert (rates.prefill_tokens_per_s, rates.step_time_s) == (200.0, 0.5)
    rates.observe(0, 0.1)  # a decode-only step: no prefill sample
    assert rates.prefill_tokens_per_s == 200.0
    assert rates.step_time_s == pytest.approx(0.5 + ALPHA * (0.1 - 0.5))
    rates.observe(10, 0.0)  # a clock that did not move says nothing
    assert rates.prefill_tokens_per_s == 200.0
