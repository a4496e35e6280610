"""Scheduler: token budget, decodes first, chunked prefill, preemption, aborts, stop rules.

No torch: ``FakeModel`` (tests/support/scheduler_model.py) stands in for the model runner,
and its outputs can be compared with ``expected_tokens``, computed without any scheduler.
"""

from __future__ import annotations

import random

import pytest

from rillet.engine.request import Request, RequestStatus
from rillet.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from rillet.errors import ValidationError
from rillet.protocol import FinishReason
from scheduler_model import (
    FakeModel,
    check_invariants,
    expected_tokens,
    make_request,
    run_all,
    step,
)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(max_model_len=2048, block_size=16, num_blocks=100)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError):
        SchedulerConfig(block_size=0)
    SchedulerConfig(max_model_len=1600, block_size=16, num_blocks=100)


def test_single_request_lifecycle() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, block_size=4, num_blocks=32
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    r = make_request("a", list(range(1, 11)), max_new_tokens=5)
    sched.add_request(r)
    output, updated = step(sched, model)
    assert [(s.num_new_tokens, s.start_position, s.samples) for s in output.scheduled] == [
        (10, 0, True)
    ]
    assert updated == [r] and r.num_output_tokens == 1
    run_all(sched, model)
    assert r.output_token_ids == expected_tokens(r.prompt_token_ids, 5)
    assert r.finish_reason is FinishReason.LENGTH and r.is_finished
    assert sched.block_manager.num_used_blocks == 0
    assert sched.get_request("a") is None and sched.num_running == sched.num_waiting == 0


def test_chunked_prefill_while_another_request_decodes_every_step() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, block_size=4, num_blocks=64
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    short = make_request("short", [1, 2, 3], max_new_tokens=20)
    sched.add_request(short)
    step(sched, model)
    long = make_request("long", list(range(5, 55)), max_new_tokens=2)  # 50 > 16 budget
    sched.add_request(long)
    chunks = []
    while long.num_output_tokens == 0:
        before = short.num_output_tokens
        output, _ = step(sched, model)
        assert short.num_output_tokens == before + 1  # the stream never stalls
        assert output.scheduled[0].request is short and output.scheduled[0].num_new_tokens == 1
        chunk = output.scheduled[1]
        chunks.append((chunk.start_position, chunk.num_new_tokens, chunk.samples))
    assert chunks == [(0, 15, False), (15, 15, False), (30, 15, False), (45, 5, True)]
    run_all(sched, model)
    assert long.output_token_ids == expected_tokens(long.prompt_token_ids, 2)
    assert short.output_token_ids == expected_tokens(short.prompt_token_ids, 20)


def test_prompt_tokens_beside_decodes_are_bounded_but_a_lone_prompt_gets_the_budget() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=16,
        max_model_len=128,
        block_size=4,
        num_blocks=64,
        max_prefill_tokens_when_decoding=6,
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    first = make_request("first", list(range(1, 21)), max_new_tokens=20)
    sched.add_request(first)
    output, _ = step(sched, model)  # alone: the whole budget, no decode to protect
    assert [s.num_new_tokens for s in output.scheduled] == [16]
    output, _ = step(sched, model)
    assert [s.num_new_tokens for s in output.scheduled] == [4]  # its last chunk samples
    second = make_request("second", list(range(30, 45)), max_new_tokens=2)
    third = make_request("third", list(range(50, 55)), max_new_tokens=2)
    sched.add_request(second)
    sched.add_request(third)
    shapes = []
    while second.num_output_tokens == 0:
        output, _ = step(sched, model)
        shapes.append([(s.request.request_id, s.num_new_tokens) for s in output.scheduled])
    # Beside "first"'s decode, 6 prompt tokens per step whether admitted or already running;
    # "third" waits: the bound is on the step, not per prompt.
    assert shapes == [
        [("first", 1), ("second", 6)],
        [("first", 1), ("second", 6)],
        [("first", 1), ("second", 3), ("third", 3)],
    ]
    run_all(sched, model)
    for r in (first, second, third):
        assert r.output_token_ids == expected_tokens(r.prompt_token_ids, r.max_new_tokens)
    with pytest.raises(ValueError):
        SchedulerConfig(max_prefill_tokens_when_decoding=0)


def test_budget_and_max_num_seqs_respected() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=3, max_num_batched_tokens=20, max_model_len=64, block_size=4, num_blocks=64
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    reqs = [make_request(f"r{i}", [i + 1] * (3 + 5 * i), max_new_tokens=4 + i) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    seen_full = []

    def on_step(output: SchedulerOutput) -> None:
        assert sched.num_running <= 3
        seen_full.append(sched.num_running == 3)

    run_all(sched, model, on_step)
    assert any(seen_full)
    for r in reqs:
        assert r.output_token_ids == expected_tokens(r.prompt_token_ids, r.max_new_tokens)
    assert sched.block_manager.num_used_blocks == 0


def test_preemption_by_recompute_keeps_tokens_intact() -> None:
    # 8 blocks of 4 = 32 slots; two requests that each grow to 24 tokens cannot both fit.
    cfg = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=32,
        block_size=4,
        num_blocks=8,
        enable_prefix_caching=False,
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    a = make_request("a", list(range(1, 13)), max_new_tokens=12)
    b = make_request("b", list(range(50, 62)), max_new_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    preempted: list[Request] = []

    def on_step(output: SchedulerOutput) -> None:
        preempted.extend(output.preempted)
        if output.preempted:
            assert sched.waiting[0] is output.preempted[-1]

    run_all(sched, model, on_step)
    assert preempted and all(r is b for r in preempted)  # the newer one yields
    assert b.num_preemptions == len(preempted) and a.num_preemptions == 0
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 12)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 12)
    assert sched.block_manager.num_used_blocks == 0


def test_no_admission_in_a_step_that_preempted() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=16,
        block_size=4,
        num_blocks=5,
        enable_prefix_caching=False,
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    sched.add_request(make_request("a", list(range(1, 9)), max_new_tokens=8))
    sched.add_request(make_request("b", list(range(20, 28)), max_new_tokens=8))
    sched.add_request(make_request("c", [99], max_new_tokens=1))
    step(sched, model)  # a and b take 4 blocks; c waits (the last one is the reserve)
    output, _ = step(sched, model)  # a needs a 3rd block: b is preempted, c must wait
    assert [r.request_id for r in output.preempted] == ["b"]
    assert [s.request.request_id for s in output.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    run_all(sched, model)


def test_prompts_wait_rather_than_enter_a_cache_they_cannot_finish_in() -> None:
    # 10 blocks of 4. a's 20-token prompt takes 5 blocks and grows to 7. b's 20-token prompt
    # would have started with a 1-block chunk, then needed 5 blocks beside a's 7: admitting
    # it on its first chunk means preempting and recomputing. It waits instead.
    cfg = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=12,
        max_model_len=32,
        block_size=4,
        num_blocks=10,
        enable_prefix_caching=False,
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    a = make_request("a", list(range(1, 21)), max_new_tokens=8)
    b = make_request("b", list(range(40, 60)), max_new_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    output, _ = step(sched, model)  # a's last chunk (8 tokens) leaves budget for b's first
    assert [s.request for s in output.scheduled] == [a]
    assert list(sched.waiting) == [b]
    assert sched.block_manager.can_allocate(b, 4, [])  # its first chunk alone would fit
    preempted: list[Request] = []
    run_all(sched, model, lambda out: preempted.extend(out.preempted))
    assert preempted == []
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 8)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 2)
    assert sched.block_manager.num_used_blocks == 0


def test_alone_a_prompt_may_take_the_whole_cache() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=2,
        max_num_batched_tokens=8,
        max_model_len=32,
        block_size=4,
        num_blocks=8,
        enable_prefix_caching=False,
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    whole = make_request("whole", list(range(1, 31)), max_new_tokens=2)  # 32 tokens: 8 blocks
    sched.add_request(whole)
    run_all(sched, model)
    assert whole.output_token_ids == expected_tokens(whole.prompt_token_ids, 2)


def test_a_request_preempting_itself_waits_for_the_next_step() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=2,
        max_num_batched_tokens=4,
        max_model_len=16,
        block_size=4,
        num_blocks=5,  # 4 for the two, 1 kept in reserve: b is admitted
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    a = make_request("a", list(range(1, 9)), max_new_tokens=8)
    b = make_request("b", [30, 31, 32, 33], max_new_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(100):
        output, _ = step(sched, model)
        if output.preempted:
            break
    # b needed a 6th block; the only unscheduled candidate was b itself. Its recompute
    # chunk would fit the budget and the block it freed, but it must not rejoin yet.
    assert output.preempted == [b] and b.num_preemptions == 1
    assert [s.request for s in output.scheduled] == [a]
    assert list(sched.waiting) == [b]
    sched.abort_request("a")
    output, _ = step(sched, model)
    # Back in, with its first block still cached; hits after a preemption are not the
    # request's prefix-cache statistic (that is about its first admission only).
    assert [(s.request, s.start_position) for s in output.scheduled] == [(b, 4)]
    assert b.num_cached_tokens == 0
    run_all(sched, model)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 8)


def test_prefix_cache_hit_through_the_scheduler() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, block_size=16, num_blocks=16
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    prefix = list(range(1, 49))  # 3 blocks
    a = make_request("a", [*prefix, 5], max_new_tokens=2)
    sched.add_request(a)
    run_all(sched, model)
    b = make_request("b", [*prefix, 6, 7], max_new_tokens=2)
    sched.add_request(b)
    output, _ = step(sched, model)
    assert [(s.start_position, s.num_new_tokens) for s in output.scheduled] == [(48, 2)]
    assert b.num_cached_tokens == 48
    assert sched.block_manager.num_prefix_hit_tokens == 48
    run_all(sched, model)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 2)
    exact = make_request("exact", prefix, max_new_tokens=1)
    sched.add_request(exact)
    output, _ = step(sched, model)
    assert output.scheduled[0].start_position == 32  # the last token is always recomputed
    assert exact.output_token_ids == expected_tokens(prefix, 1)


def test_abort_from_waiting_and_running_frees_everything() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=16
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    a = make_request("a", list(range(1, 10)), max_new_tokens=20)
    b = make_request("b", [3, 4], max_new_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    assert sched.num_running == 1 and sched.num_waiting == 1
    assert sorted(sched.request_ids()) == ["a", "b"]
    assert sched.abort_request("b") is b
    assert b.finish_reason is FinishReason.ABORT and b.status is RequestStatus.FINISHED
    assert sched.num_waiting == 0
    assert sched.abort_request("a") is a
    assert a.block_ids == [] and sched.block_manager.num_used_blocks == 0
    assert sched.abort_request("a") is None and sched.abort_request("nope") is None
    assert not sched.has_unfinished_requests()
    assert sched.schedule().is_empty


def test_abort_between_schedule_and_update() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=16
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    a, b = make_request("a", [1, 2]), make_request("b", [3, 4])
    sched.add_request(a)
    sched.add_request(b)
    output = sched.schedule()
    sampled = model.run(output)
    sched.abort_request("a")
    assert sched.update_from_output(output, sampled) == [b]
    assert a.num_output_tokens == 0 and sched.block_manager.num_used_blocks == 1
    check_invariants(sched)


def test_finish_request_for_stop_string() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=16
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    r = make_request("a", [1, 2, 3], max_new_tokens=50)
    sched.add_request(r)
    step(sched, model)
    sched.finish_request("a", FinishReason.STOP_SEQUENCE)
    sched.finish_request("a", FinishReason.STOP_SEQUENCE)  # already gone: no-op
    assert r.finish_reason is FinishReason.STOP_SEQUENCE
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished_requests()


def test_add_request_rejects_duplicates_and_overlong_prompts() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=32, num_blocks=8, block_size=4))
    sched.add_request(make_request("a", [1]))
    with pytest.raises(ValidationError):
        sched.add_request(make_request("a", [1]))
    with pytest.raises(ValidationError):
        sched.add_request(make_request("b", list(range(33))))
    with pytest.raises(ValidationError):
        sched.add_request(make_request("c", []))


def scripted(
    sched: Scheduler, request: Request, tokens: list[int]
) -> tuple[list[int], FinishReason | None]:
    """Feed ``tokens`` as the sampled ids until the request finishes."""
    sched.add_request(request)
    for token in tokens:
        output = sched.schedule()
        sched.update_from_output(output, {request.request_id: [token]})
        if request.is_finished:
            break
    assert sched.block_manager.num_used_blocks == 0 or not request.is_finished
    return request.output_token_ids, request.finish_reason


@pytest.mark.parametrize(
    ("params", "max_new", "tokens", "expected", "reason"),
    [
        ({}, 3, [5, 6, 7, 8], [5, 6, 7], FinishReason.LENGTH),
        ({}, 10, [5, 2, 7], [5, 2], FinishReason.EOS_TOKEN),
        ({"ignore_eos": True}, 4, [5, 2, 2, 7], [5, 2, 2, 7], FinishReason.LENGTH),
        ({"min_tokens": 3}, 10, [2, 2, 2, 9], [2, 2, 2], FinishReason.EOS_TOKEN),
        ({"min_tokens": 2}, 10, [5, 9, 2], [5, 9, 2], FinishReason.EOS_TOKEN),
        ({"stop_token_ids": [9]}, 10, [5, 9, 7], [5, 9], FinishReason.STOP_SEQUENCE),
        (
            {"stop_token_ids": [9], "min_tokens": 3},
            10,
            [9, 9, 9],
            [9, 9, 9],
            FinishReason.STOP_SEQUENCE,
        ),
        (
            {"ignore_eos": True, "stop_token_ids": [2]},
            10,
            [5, 2],
            [5, 2],
            FinishReason.STOP_SEQUENCE,
        ),
        ({}, 1, [2], [2], FinishReason.LENGTH),  # the token cap is checked first
    ],
)
def test_stop_conditions(
    params: dict[str, object],
    max_new: int,
    tokens: list[int],
    expected: list[int],
    reason: FinishReason,
) -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=16
    )
    sched = Scheduler(cfg, eos_token_ids=frozenset({2, 3}))
    request = make_request("r", [1, 1, 1], max_new_tokens=max_new, **params)
    assert scripted(sched, request, tokens) == (expected, reason)


def test_max_model_len_stops_with_length() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=12, block_size=4, num_blocks=3
    )
    sched = Scheduler(cfg)
    request = make_request("r", list(range(1, 11)), max_new_tokens=100)
    out, reason = scripted(sched, request, [7] * 10)
    assert out == [7, 7] and reason is FinishReason.LENGTH
    assert sched.block_manager.num_used_blocks == 0


def test_update_returns_only_sampling_requests_in_batch_order() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=10, max_model_len=64, block_size=4, num_blocks=32
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    a = make_request("a", [1, 2])
    sched.add_request(a)
    step(sched, model)
    b = make_request("b", list(range(20)))
    c = make_request("c", [4, 5, 6])
    sched.add_request(b)
    sched.add_request(c)
    output, updated = step(sched, model)  # a decodes, b gets a 9-token chunk, c must wait
    assert [s.request for s in output.scheduled] == [a, b]
    assert updated == [a]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_randomized_invariants(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        max_num_seqs=6,
        max_num_batched_tokens=24,
        max_model_len=48,
        block_size=4,
        num_blocks=14,
        enable_prefix_caching=prefix_caching,
        max_prefill_tokens_when_decoding=rng.choice([None, 1, 5]),
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    prefixes = [[rng.randrange(1, 900) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    pending: list[Request] = []
    for i in range(100):
        shared = rng.choice(prefixes) if rng.random() < 0.6 else []
        tail = [rng.randrange(1, 900) for _ in range(rng.randrange(1, 20))]
        prompt = (shared + tail)[: cfg.max_model_len]
        pending.append(make_request(f"r{i}", prompt, max_new_tokens=rng.randrange(1, 25)))
    all_requests = list(pending)
    num_preemptions = 0
    for _ in range(20_000):
        for _ in range(rng.randrange(0, 3)):
            if pending:
                sched.add_request(pending.pop(0))
        if rng.random() < 0.08:
            live = sched.running + list(sched.waiting)
            if live:
                victim = rng.choice(live)
                if rng.random() < 0.5:
                    assert sched.abort_request(victim.request_id) is victim
                else:
                    sched.finish_request(victim.request_id, FinishReason.STOP_SEQUENCE)
                check_invariants(sched)
        output, updated = step(sched, model)
        num_preemptions += len(output.preempted)
        assert all(r.num_output_tokens > 0 for r in updated)
        if not pending and not sched.has_unfinished_requests():
            break
    else:
        raise AssertionError("did not finish")

    assert num_preemptions > 0
    assert sched.block_manager.num_used_blocks == 0
    assert sched.num_running == sched.num_waiting == 0
    for r in all_requests:
        assert r.is_finished and r.block_ids == [] and sched.get_request(r.request_id) is None
        # Whatever happened (preemption, prefix hits, aborts), the tokens are the true ones.
        assert r.output_token_ids == expected_tokens(r.prompt_token_ids, r.num_output_tokens)
        if r.finish_reason is FinishReason.LENGTH:
            assert r.num_output_tokens == r.max_new_tokens or r.num_tokens >= cfg.max_model_len
    if prefix_caching:
        assert sched.block_manager.num_prefix_hit_tokens > 0


def test_queued_prompt_tokens_count_what_is_left_to_prefill() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, block_size=4, num_blocks=64
    )
    sched, model = Scheduler(cfg), FakeModel(cfg)
    sched.add_request(make_request("a", list(range(1, 41))))
    sched.add_request(make_request("b", list(range(1, 11))))
    assert sched.num_queued_prompt_tokens == 50
    step(sched, model)  # a's first 16-token chunk
    assert sched.num_queued_prompt_tokens == 34
    run_all(sched, model)
    assert sched.num_queued_prompt_tokens == 0
