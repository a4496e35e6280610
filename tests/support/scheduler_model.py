"""A stand-in for the model runner in scheduler tests (no torch).

:class:`FakeModel` keeps a "KV cache" of token ids indexed by slot (block id * block_size +
offset), checks that every position a chunk attends to holds the right token (so a wrong
block table or a bad prefix hit fails), writes the chunk's tokens, and samples a token that
is a pure function of the context. Outputs can therefore be compared with
:func:`expected_tokens`, computed without any scheduler.
"""

from __future__ import annotations

from collections.abc import Callable

from rillet.engine.request import Request, RequestStatus
from rillet.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from rillet.sampling import SamplingParams


def next_token(context: list[int]) -> int:
    acc = 0
    for token in context:
        acc = (acc * 31 + token) % 1_000_003
    return 1000 + acc % 997


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


class FakeModel:
    def __init__(self, config: SchedulerConfig) -> None:
        self.block_size = config.block_size
        self.kv: list[int | None] = [None] * (config.num_blocks * config.block_size)

    def slot(self, request: Request, pos: int) -> int:
        return request.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, output: SchedulerOutput) -> dict[str, list[int]]:
        """The "model"'s token after each sampling position (after each draft too)."""
        sampled: dict[str, list[int]] = {}
        for item in output.scheduled:
            r, start, end = (
                item.request,
                item.start_position,
                item.start_position + item.num_new_tokens,
            )
            assert start == r.num_computed_tokens
            assert len(r.block_ids) * self.block_size >= end
            for pos in range(start):
                assert self.kv[self.slot(r, pos)] == r.all_token_ids[pos], (r.request_id, pos)
            for pos, token in zip(range(start, end), item.token_ids, strict=True):
                self.kv[self.slot(r, pos)] = token
            if item.samples:
                first = end - len(item.draft_token_ids)
                sampled[r.request_id] = [
                    next_token([self.kv[self.slot(r, p)] for p in range(stop)])  # type: ignore[misc]
                    for stop in range(first, end + 1)
                ]
        return sampled


def make_request(rid: str, prompt: list[int], max_new_tokens: int = 8, **params: object) -> Request:
    return Request(rid, prompt, SamplingParams(**params), 0.0, max_new_tokens)  # type: ignore[arg-type]


def check_invariants(sched: Scheduler, output: SchedulerOutput | None = None) -> None:
    cfg, bm = sched.config, sched.block_manager
    holders = [0] * cfg.num_blocks
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert len(set(r.block_ids)) == len(r.block_ids)
        for b in r.block_ids:
            holders[b] += 1
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING
        assert r.block_ids == [] and r.num_computed_tokens == 0
    free = set(bm.free_block_ids())
    for block in bm.blocks:
        assert block.ref_count == holders[block.block_id]
        assert (block.block_id in free) == (block.ref_count == 0)
    hashes = [b.block_hash for b in bm.blocks if b.block_hash is not None]
    assert len(hashes) == len(set(hashes)) == bm.num_cached_blocks
    assert len(sched.running) <= cfg.max_num_seqs
    if output is not None:
        assert output.num_batched_tokens <= cfg.max_num_batched_tokens
        sizes = [s.num_new_tokens for s in output.scheduled]
        assert all(n >= 1 for n in sizes)
        decode = [s.is_decode for s in output.scheduled]
        assert decode == sorted(decode, reverse=True)  # decodes (with drafts) first
        ids = {s.request.request_id for s in output.scheduled}
        assert len(ids) == len(sizes)
        # A request preempted in a step is not re-admitted in the same step.
        assert not ids & {r.request_id for r in output.preempted}


def step(sched: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[Request]]:
    output = sched.schedule()
    check_invariants(sched, output)
    updated = sched.update_from_output(output, model.run(output))
    check_invariants(sched)
    return output, updated


def run_all(
    sched: Scheduler, model: FakeModel, on_step: Callable[[SchedulerOutput], None] | None = None
) -> int:
    for num_steps in range(1, 10_000):
        output, _ = step(sched, model)
        if on_step is not None:
            on_step(output)
        if not sched.has_unfinished_requests():
            return num_steps
    raise AssertionError("scheduler did not finish")
