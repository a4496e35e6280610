"""Fewer, larger events when the host is the bottleneck: how many engine steps a stream's
tokens may wait to go out together (vLLM's ``--stream-interval``, but adaptive).

Every event a server sends costs CPU outside the engine, per event rather than per token:
0.12 ms in ``rillet serve``'s own HTTP server, about 0.9 ms through Ray Serve's replica and
proxy (``bench/RESULTS.md``). An engine step makes one event per live stream, and a batched
step costs the engine far less per row than a lone one, so as streams grow the host's share
of each step grows with them; on a machine where both share the cores, that share comes out
of the engine's. Sending the tokens of the last ``k`` steps as one event divides it by ``k``.

Two signals, both read when a step's outputs reach the event loop:

* **live streams**: the events one step asks the host for. Up to :attr:`streams_per_event_step`
  of them every token goes out the moment it is sampled; past that the hold grows by one step
  per that many streams more, so the host sends about that many events per step.
* **the event loop's lag**: the time from the engine's thread posting a step's outputs to the
  loop delivering them, smoothed, against the smoothed step interval. A loop that is more than
  half a step late is itself the bottleneck, whatever the stream count: hold at least 2.

Each stream caps the hold at its own maximum (the server's ``--max-merge-steps``, 4 by
default): a token waits at most that many minus one further steps of its request. A
stream's first token, its end and an error always go out at once, so time to first token and
the final event are never held. TGI's ``/generate_stream`` (one event per token anyway) asks
for no hold. A request its own timeout ends (``X-Rillet-Timeout-Ms``) loses the tokens held
at that moment (at most the hold minus one step's): they were never sent, and its usage
counts only what was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Weight of the newest sample in the smoothed lag and step interval (about the last 5 steps).
SMOOTHING = 0.2


@dataclass
class StreamPacer:
    """The engine's current hold, in steps, shared by every stream that may merge.

    :meth:`observe` is called once per delivered step with the signals; :attr:`hold_steps`
    is then what a stream waits for (each stream caps it at its own maximum).
    """

    #: Live streams the host serves one event per step for, before holding.
    streams_per_event_step: int = 8
    hold_steps: int = field(default=1, init=False)
    lag_s: float = field(default=0.0, init=False)
    step_interval_s: float | None = field(default=None, init=False)
    _last_posted_at: float | None = field(default=None, init=False, repr=False)

    def observe(self, posted_at: float, delivered_at: float, live_streams: int) -> int:
        """Take one step's signals (``time.monotonic()`` when the engine's thread posted its
        outputs and when the loop delivered them; open streams) and return the new hold."""
        lag = max(0.0, delivered_at - posted_at)
        self.lag_s += SMOOTHING * (lag - self.lag_s)
        if self._last_posted_at is not None:
            interval = max(0.0, posted_at - self._last_posted_at)
            if self.step_interval_s is None:
                self.step_interval_s = interval
            else:
                self.step_interval_s += SMOOTHING * (interval - self.step_interval_s)
        self._last_posted_at = posted_at
        self.hold_steps = hold_for(
            live_streams,
            self.lag_s,
            self.step_interval_s,
            self.streams_per_event_step,
        )
        return self.hold_steps


def hold_for(
    live_streams: int,
    lag_s: float,
    step_interval_s: float | None,
    streams_per_event_step: int = 8,
) -> int:
    """The hold, in steps, for these signals (the policy alone, for tests and tools); each
    stream caps it at its own maximum."""
    hold = max(1, math.ceil(live_streams / streams_per_event_step))
    if step_interval_s and lag_s > step_interval_s / 2:
        hold = max(hold, 2)
    return hold
