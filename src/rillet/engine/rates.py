"""What the core measures of its own speed, cheaply, for the server's deadlines.

Two moving averages (EWMA), updated once per step from one clock reading around the
forward: prompt tokens computed per second over the steps that prefilled, and the time of
a step. With the prompt tokens still queued (the scheduler's count), they predict a new
request's time to its first token (``rillet.server.deadlines``) and how fast a backlog
drains. Until a step has been measured both are 0: "unknown", and nothing is refused on a
guess.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Weight of the newest sample: about the last ten steps count.
ALPHA = 0.2


@dataclass
class EngineRates:
    """EWMA of prefill tokens/s and of step seconds (0.0: not measured yet)."""

    prefill_tokens_per_s: float = 0.0
    step_time_s: float = 0.0

    def observe(self, num_prefill_tokens: int, duration_s: float) -> None:
        """One step's prompt tokens and its wall time."""
        if duration_s <= 0:
            return
        self.step_time_s = _ewma(self.step_time_s, duration_s)
        if num_prefill_tokens > 0:
            rate = num_prefill_tokens / duration_s
            self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, rate)


def _ewma(average: float, sample: float) -> float:
    return sample if average == 0.0 else average + ALPHA * (sample - average)
