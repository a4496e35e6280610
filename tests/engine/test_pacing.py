"""The merging policy (``engine/pacing.py``) driven with explicit signals, and the collector
that applies it: no clocks, no event loop timing."""

from __future__ import annotations

import asyncio

from rillet.engine.collector import RequestCollector
from rillet.engine.pacing import StreamPacer, hold_for
from rillet.errors import GenerationError
from rillet.protocol import FinishReason, GeneratedToken, RequestOutput


def test_few_streams_and_a_punctual_loop_hold_nothing() -> None:
    for live in range(9):
        assert hold_for(live, lag_s=0.0001, step_interval_s=0.006) == 1


def test_the_hold_grows_one_step_per_eight_streams() -> None:
    assert [hold_for(n, 0.0, 0.05) for n in (9, 16, 17, 24, 25, 64)] == [2, 2, 3, 3, 4, 8]


def test_a_loop_late_by_half_a_step_holds_two_steps_even_for_one_stream() -> None:
    assert hold_for(1, lag_s=0.0049, step_interval_s=0.01) == 1
    assert hold_for(1, lag_s=0.0051, step_interval_s=0.01) == 2
    assert hold_for(64, lag_s=0.0051, step_interval_s=0.01) == 8  # the larger rule wins
    assert hold_for(1, lag_s=1.0, step_interval_s=None) == 1  # no step measured yet


def test_the_pacer_smooths_the_lag_over_steps() -> None:
    pacer = StreamPacer()
    posted = 0.0
    for _ in range(20):  # a punctual loop, a step every 10 ms
        posted += 0.010
        assert pacer.observe(posted, posted + 0.0005, live_streams=1) == 1
    # One late delivery is one sample of five: no hold yet.
    posted += 0.010
    assert pacer.observe(posted, posted + 0.009, live_streams=1) == 1
    # A loop that stays late: the smoothed lag passes half a step within a few steps.
    holds = []
    for _ in range(10):
        posted += 0.010
        holds.append(pacer.observe(posted, posted + 0.009, live_streams=1))
    assert holds[-1] == 2 and holds[0] == 1
    assert pacer.observe(posted + 0.010, posted + 0.010, live_streams=40) == 5


def output(num_generated: int, step: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        tokens=[GeneratedToken(7, "x", None, False)],
        text="x",
        finish_reason=FinishReason.LENGTH if finished else None,
        num_generated_tokens=num_generated,
        step=step,
    )


async def test_a_holding_collector_releases_every_nth_step_first_token_and_end_at_once() -> None:
    pacer = StreamPacer()
    pacer.hold_steps = 3
    collector = RequestCollector(pacer=pacer, max_hold_steps=4)
    taken: list[tuple[int, str, int]] = []

    def take() -> None:
        item = collector.take_nowait()
        if item is not None:
            assert isinstance(item, RequestOutput)
            taken.append((len(item.tokens), item.text, item.step))

    for step in range(1, 9):
        collector.put(output(step, step, finished=step == 8))
        take()
    # The first token at once; then every third step; the end at once (two steps held).
    assert taken == [(1, "x", 1), (3, "xxx", 4), (3, "xxx", 7), (1, "x", 8)]
    assert sum(n for n, _, _ in taken) == 8


async def test_the_stream_caps_the_pacer_and_an_error_is_never_held() -> None:
    pacer = StreamPacer()
    pacer.hold_steps = 8
    collector = RequestCollector(pacer=pacer, max_hold_steps=2)
    collector.put(output(1, 1))
    assert collector.take_nowait() is not None  # the first token
    collector.put(output(2, 2))
    assert collector.take_nowait() is None  # held: one step of two
    collector.put(output(3, 3))
    item = collector.take_nowait()
    assert isinstance(item, RequestOutput) and len(item.tokens) == 2
    collector.put(output(4, 4))
    collector.put(GenerationError("boom"))
    assert isinstance(collector.take_nowait(), GenerationError)


async def test_a_lower_hold_releases_a_held_output_at_the_next_step() -> None:
    pacer = StreamPacer()
    pacer.hold_steps = 4
    collector = RequestCollector(pacer=pacer, max_hold_steps=4)
    collector.put(output(1, 1))
    collector.take_nowait()
    collector.put(output(2, 2))
    collector.put(output(3, 3))
    assert collector.take_nowait() is None
    pacer.hold_steps = 1  # the load went away
    collector.put(output(4, 4))
    item = collector.take_nowait()
    assert isinstance(item, RequestOutput) and item.text == "xxx" and item.step == 4


async def test_without_a_pacer_a_reader_gets_each_step_and_take_waits_for_a_due_output() -> None:
    collector = RequestCollector()
    for step in (1, 2):
        collector.put(output(step, step))
        item = collector.take_nowait()
        assert isinstance(item, RequestOutput) and item.step == step
    pacer = StreamPacer()
    pacer.hold_steps = 2
    held = RequestCollector(pacer=pacer, max_hold_steps=2)
    held.put(output(1, 1))
    held.take_nowait()
    held.put(output(2, 2))
    waiter = asyncio.ensure_future(held.take())
    await asyncio.sleep(0)
    assert not waiter.done()  # one step of two: the reader waits
    held.put(output(3, 3))
    item = await waiter
    assert isinstance(item, RequestOutput) and item.text == "xx"
