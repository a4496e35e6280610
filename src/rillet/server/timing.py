"""Per-event server timing, for a request that asks (``X-Rillet-Timing: 1``; ``timing`` in a
``/ws`` generate frame or in gRPC request parameters). Without it nothing here runs and no
byte on the wire changes.

Every event of such a stream carries::

    "rillet_timing": {"emitted_at": <unix seconds>, "step": <engine step>, "tokens": <n>}

and the event that ends the generation (the one with the finish reason: TGI's last event,
OpenAI's finish chunk, Anthropic's ``message_delta``, the Responses' ``response.completed``
or ``response.incomplete``, ``/ws``'s ``done`` frame, gRPC's final response) adds::

    "queued_s":  admission -> the engine first scheduled the request
    "prefill_s": first scheduled -> the engine sampled the first token
    "ttft_s":    admission -> the server emitted the first token's event
    "decode_tokens_per_s": tokens after the first / the time between their events

``ttft_s - queued_s - prefill_s`` is the server's own delivery time (the hop from the engine,
detokenizing, rendering; a reader that stalls before its first token, too); a client that
subtracts ``ttft_s`` from the time to first token it measured has the network's share. A
value the engine did not report is ``null``. ``tokens`` counts the tokens that event
delivers, so over a stream they add up to the usage's generated tokens. ``step`` never
decreases (events made from one merged output share its latest step).

One :class:`StreamTiming` per generation computes all of it; each door's renderer asks it
for the object to attach, so the doors only decide where it goes.
"""

from __future__ import annotations

import time
from typing import Any

from rillet.protocol import RequestOutput

#: The key each door puts the timing under (a JSON field, or a gRPC response parameter).
TIMING_KEY = "rillet_timing"


class StreamTiming:
    """The timing of one generation's events, from its admission (``start_time``,
    ``time.monotonic()``) on."""

    def __init__(self, start_time: float) -> None:
        self.start_time = start_time
        # emitted_at is the wall clock read once, then advanced by the monotonic clock: a
        # wall clock that steps back mid-stream would break "emitted_at never decreases".
        self._wall_offset = time.time() - time.monotonic()
        self._step = 0
        self._num_reported = 0
        self._first_scheduled_time: float | None = None
        self._first_token_time: float | None = None
        self._first_emitted: float | None = None
        self._last_emitted: float | None = None

    def stamp(
        self, out: RequestOutput | None, *, final: bool, tokens: int | None = None
    ) -> dict[str, Any]:
        """The ``rillet_timing`` object for an event made from ``out`` now (None: an event
        no output made, such as the end of a cancelled generation).

        ``tokens`` is how many tokens that event delivers; by default, every token ``out``'s
        generation has produced that no earlier event reported (an output whose text is held
        back makes no event, so the next one delivers its tokens). ``final`` adds the summary.
        """
        now = time.monotonic()
        if out is not None:
            self._step = max(self._step, out.step)
            if self._first_scheduled_time is None:
                self._first_scheduled_time = out.first_scheduled_time
            if self._first_token_time is None:
                self._first_token_time = out.first_token_time
        if tokens is None:
            generated = 0 if out is None else out.num_generated_tokens
            tokens = max(0, generated - self._num_reported)
        self._num_reported += tokens
        if tokens:
            if self._first_emitted is None:
                self._first_emitted = now
            self._last_emitted = now
        timing: dict[str, Any] = {
            "emitted_at": round(now + self._wall_offset, 6),
            "step": self._step,
            "tokens": tokens,
        }
        if final:
            timing.update(self.summary())
        return timing

    def summary(self) -> dict[str, float | None]:
        """Where the time to first token went, and the decode rate the events show."""
        scheduled, first_token = self._first_scheduled_time, self._first_token_time
        queued = None if scheduled is None else max(0.0, scheduled - self.start_time)
        prefill = None
        if scheduled is not None and first_token is not None:
            prefill = max(0.0, first_token - scheduled)
        ttft = None if self._first_emitted is None else self._first_emitted - self.start_time
        rate = None
        if self._first_emitted is not None and self._last_emitted is not None:
            span = self._last_emitted - self._first_emitted
            if self._num_reported > 1 and span > 0:
                rate = (self._num_reported - 1) / span
        return {
            "queued_s": _seconds(queued),
            "prefill_s": _seconds(prefill),
            "ttft_s": _seconds(ttft),
            "decode_tokens_per_s": None if rate is None else round(rate, 3),
        }


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
