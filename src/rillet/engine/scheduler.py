"""Continuous batching over a per-step token budget (tokens, not phases).

Each request has ``num_computed_tokens`` and ``num_tokens``; every step gives it
``min(num_tokens - num_computed_tokens, remaining budget)`` tokens. A whole prompt, a chunk
of a long prompt, a recompute after preemption and a single decode token are all that one
rule, so chunked prefill and prefix caching need no special phase.

Order within a step: running requests first (decodes before multi-token chunks, so a long
prompt never stalls the streams already flowing), then waiting requests FCFS while the
budget, ``max_num_seqs`` and the KV blocks allow. When the step carries decodes, its prompt
tokens (chunks and admissions together) are capped at ``max_prefill_tokens_when_decoding``:
each prompt token lengthens the step every running stream waits for.

When blocks run out for a running request, the most recently arrived unscheduled running
request is preempted by recompute: its blocks are freed and it goes back to the front of the
queue with its tokens intact.

Speculation (``engine/speculation.py``) is the same rule with guessed tokens: a decode row
may carry draft tokens after its last token (or slots a draft model fills in the runner),
scheduled only where budget and free blocks allow without preempting anyone.
:meth:`Scheduler.update_from_output` keeps the drafts the model agreed with (and the
model's next token), and gives back the slots of the rest.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rillet.engine.block_manager import BlockManager
from rillet.engine.request import Request, RequestStatus
from rillet.engine.speculation import Speculator
from rillet.errors import ValidationError
from rillet.protocol import FinishReason


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits and KV-cache shape. Raises ValueError when inconsistent."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    #: Prompt tokens a step may carry beside running decodes (None: the whole budget). A
    #: step's time grows with its prompt tokens and every running stream waits for it, so
    #: this bounds their inter-token gap while prompts prefill; alone, a prompt still gets
    #: the whole budget.
    max_prefill_tokens_when_decoding: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        bound = self.max_prefill_tokens_when_decoding
        if bound is not None and bound <= 0:
            raise ValueError("max_prefill_tokens_when_decoding must be positive")
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise ValueError("block_size and num_blocks must be positive")
        # Otherwise the newest decodes could be starved of budget by older ones every step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        # One request of max_model_len must fit on its own, or preemption could loop forever.
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"KV cache holds {self.num_blocks * self.block_size} tokens, "
                f"less than max_model_len={self.max_model_len}"
            )


@dataclass
class ScheduledRequest:
    """One request's share of a step: positions ``start_position`` .. ``+ num_new_tokens``.

    A speculative row ends with ``draft_token_ids`` (counted in ``num_new_tokens``): guesses
    of the tokens after the request's last one, for the model to verify. With a draft model
    they are not known when the row is scheduled: ``num_pending_drafts`` slots are counted
    instead, and the model runner fills them (:meth:`fill_drafts`) before its forward.
    """

    request: Request
    num_new_tokens: int
    start_position: int
    draft_token_ids: list[int] = field(default_factory=list)
    num_pending_drafts: int = 0
    # Fixed at schedule time: after update_from_output appends the sampled token, the
    # request's num_tokens moves on, but this chunk still was the sampling one.
    _samples: bool = field(init=False, repr=False)
    #: Draft slots the row was given (its blocks cover them until verification trims them).
    num_draft_slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_draft_slots = len(self.draft_token_ids) + self.num_pending_drafts
        end = self.start_position + self.num_new_tokens - self.num_draft_slots
        self._samples = end == self.request.num_tokens

    def fill_drafts(self, token_ids: list[int]) -> None:
        """The pending drafts' tokens; fewer than were pending shortens the row."""
        if len(token_ids) > self.num_pending_drafts:
            raise ValueError(f"{len(token_ids)} drafts for {self.num_pending_drafts} slots")
        self.num_new_tokens -= self.num_pending_drafts - len(token_ids)
        self.draft_token_ids = [*self.draft_token_ids, *token_ids]
        self.num_pending_drafts = 0

    @property
    def token_ids(self) -> list[int]:
        """The row's input ids: known tokens, then drafts."""
        assert self.num_pending_drafts == 0, "the draft model has not filled this row"
        known = self.request.all_token_ids[self.start_position :]
        return (known + self.draft_token_ids)[: self.num_new_tokens]

    @property
    def is_decode(self) -> bool:
        """One known token (and maybe drafts after it): decode rows, one per position."""
        return self.num_new_tokens == 1 + len(self.draft_token_ids) + self.num_pending_drafts

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so a token is sampled."""
        return self._samples


@dataclass
class SchedulerOutput:
    """What one step runs. ``scheduled`` is in batch order: single-token decodes first."""

    scheduled: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides which tokens of which requests run each step; tracks when requests finish."""

    def __init__(
        self,
        config: SchedulerConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        speculator: Speculator | None = None,
    ):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.speculator = speculator
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Request] = deque()
        #: Sorted by arrival (the order of add_request), so the last entry is the first
        #: candidate for preemption even after preempted requests come back.
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self._arrival_rank: dict[str, int] = {}
        self._next_rank = itertools.count()

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_queued_prompt_tokens(self) -> int:
        """Tokens still to prefill before the requests queued now have their first token:
        waiting requests' uncomputed tokens (a preempted one's output too) and running
        prompts' unfinished chunks. One pass over the queues, when stats are read."""
        waiting = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        running = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.running)
        return waiting + running

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def request_ids(self) -> list[str]:
        """Ids of every unfinished request, running and waiting."""
        return list(self._requests)

    # -- lifecycle -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (FCFS). The engine validates lengths first; this re-checks."""
        if request.request_id in self._requests:
            raise ValidationError(f"request id {request.request_id!r} is already in use")
        if not 0 < request.num_tokens <= self.config.max_model_len:
            raise ValidationError(
                f"prompt must have between 1 and {self.config.max_model_len} tokens"
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._arrival_rank[request.request_id] = next(self._next_rank)
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a waiting or running request with ABORT; frees its blocks at once."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request_id, FinishReason.ABORT)
        return request

    def finish_request(self, request_id: str, reason: FinishReason) -> None:
        """End a request from outside the step (abort, stop string found by the front end)."""
        request = self._requests.get(request_id)
        if request is None:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, reason)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Free and forget a request that is already out of the running/waiting queues."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.block_manager.free(request)
        del self._requests[request.request_id]
        del self._arrival_rank[request.request_id]
        if self.speculator is not None:
            self.speculator.release(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- the step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then admissions unless preempting."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        done: set[str] = set()
        bm = self.block_manager
        prefill_bound = self.config.max_prefill_tokens_when_decoding
        decodes = 0
        spec = self.speculator
        speculate = spec is not None and spec.step_allows(len(self.running))

        # Decodes (one token left) before chunks; arrival order within each group.
        for request in sorted(self.running, key=_is_chunk):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            left = request.num_tokens - request.num_computed_tokens
            if left > 1 and decodes and prefill_bound is not None:
                # The decodes are in (they sort first): cap what chunks add to this step.
                budget = min(budget, prefill_bound)
                prefill_bound = None
            num_new = min(left, budget)
            drafts, pending = self._drafts(request, budget) if speculate and left == 1 else ([], 0)
            if drafts or pending:
                num_new += len(drafts) + pending
            elif not self._make_room(request, num_new, done, preempted):
                continue
            bm.allocate(request, num_new, [])
            scheduled.append(
                ScheduledRequest(request, num_new, request.num_computed_tokens, drafts, pending)
            )
            done.add(request.request_id)
            budget -= num_new
            decodes += left == 1
        if decodes and prefill_bound is not None:
            budget = min(budget, prefill_bound)  # no chunk was running: admissions get the cap

        # Admitting while preempting would just shuffle blocks between requests. A prompt is
        # admitted only if the free blocks hold all of it, beside what the running prompts
        # still need to finish prefilling and a reserve for decodes to grow into: a prompt
        # that would have to be preempted halfway is cheaper left waiting. (At 64 streams of
        # 1,000-token prompts in 47k tokens of cache, admitting on the first chunk alone
        # preempted and recomputed until TTFT p99 reached 98 s.)
        committed = sum(bm.num_blocks_to_cover(r, r.num_tokens) for r in self.running)
        reserve = max(1, self.config.num_blocks // 100)
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            computed_ids, num_hit = bm.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            first = bm.num_blocks_to_allocate(request, num_new, computed_ids)
            if first > bm.num_free_blocks:
                break
            whole = bm.num_blocks_to_allocate(request, request.num_tokens - num_hit, computed_ids)
            if self.running and whole + committed + reserve > bm.num_free_blocks:
                break  # alone, a prompt may take the whole cache (it fits by construction)
            committed += whole - first
            bm.allocate(request, num_new, computed_ids)
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_hit
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: self._arrival_rank[r.request_id])
            scheduled.append(ScheduledRequest(request, num_new, num_hit))
            budget -= num_new

        scheduled.sort(key=lambda s: not s.is_decode)  # stable: decodes first
        return SchedulerOutput(scheduled, preempted)

    def _drafts(self, request: Request, budget: int) -> tuple[list[int], int]:
        """Draft tokens for a decode row, or the number of slots the runner's draft model
        fills: as many as the budget, the request's token cap and context, and the free
        blocks allow (never at the cost of a preemption)."""
        spec = self.speculator
        assert spec is not None
        room = min(
            budget - 1,
            request.max_new_tokens - request.num_output_tokens - 1,
            self.config.max_model_len - request.num_tokens - 1,
        )
        fits = self.block_manager.can_allocate
        if spec.drafts_in_runner:
            k = spec.num_to_draft(request, room)
            while k and not fits(request, 1 + k, []):
                k -= 1
            return [], k
        drafts = spec.propose(request, room)
        while drafts and not fits(request, 1 + len(drafts), []):
            drafts.pop()
        return drafts, 0

    def _make_room(
        self, request: Request, num_new: int, done: set[str], preempted: list[Request]
    ) -> bool:
        """Preempt until ``request`` fits; False when ``request`` itself had to go.

        Victims are the most recently arrived running requests not yet scheduled this
        step (already scheduled ones hold blocks the batch needs), ending with ``request``.
        """
        while not self.block_manager.can_allocate(request, num_new, []):
            victim = next(r for r in reversed(self.running) if r.request_id not in done)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]]
    ) -> list[Request]:
        """Advance every scheduled request; append sampled tokens; finish stopped requests.

        ``sampled`` maps request id -> the model's token at each verified position, for every
        scheduled request whose chunk ``samples``: one token, or ``1 + len(drafts)`` for a
        speculative row (the model's choice after its last token and after each draft).
        Drafts are kept while they equal the model's choice; the model's token after the
        last kept one is appended too. ``request.num_step_tokens`` says how many were
        appended. Returns the requests that got tokens this step, in scheduled order
        (finished ones have ``finish_reason`` set and are already freed).
        """
        updated: list[Request] = []
        stopped: list[tuple[Request, FinishReason]] = []
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished from outside between schedule() and now
            drafts = item.draft_token_ids
            request.num_computed_tokens += item.num_new_tokens - len(drafts)
            if not item.samples:
                self.block_manager.cache_full_blocks(request)
                continue
            targets = sampled[request.request_id]
            num_accepted = 0
            while num_accepted < len(drafts) and drafts[num_accepted] == targets[num_accepted]:
                num_accepted += 1
            request.num_step_tokens = 0
            reason = None
            for token_id in targets[: num_accepted + 1]:
                request.append_token(token_id)
                request.num_step_tokens += 1
                reason = self._check_stop(request, token_id)
                if reason is not None:
                    break
            if item.num_draft_slots:
                # The KV of every kept draft is computed; rejected ones' slots are given back
                # (and those a draft model reserved but did not fill).
                request.num_computed_tokens += request.num_step_tokens - 1
                self.block_manager.trim(request, request.num_computed_tokens)
                assert self.speculator is not None
                self.speculator.observe(request.request_id, len(drafts), num_accepted)
            self.block_manager.cache_full_blocks(request)
            if reason is not None:
                stopped.append((request, reason))
            updated.append(request)
        if stopped:
            finished = {id(r) for r, _ in stopped}
            self.running = [r for r in self.running if id(r) not in finished]
            for request, reason in stopped:
                self._finish(request, reason)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.params
        if request.num_output_tokens >= request.max_new_tokens:
            return FinishReason.LENGTH
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.EOS_TOKEN
            if token_id in params.stop_token_ids:
                return FinishReason.STOP_SEQUENCE
        if request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None


def _is_chunk(request: Request) -> bool:
    """Sort key putting decodes (exactly one token to compute) before multi-token chunks."""
    return request.num_tokens - request.num_computed_tokens > 1
