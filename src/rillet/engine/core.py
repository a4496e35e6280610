"""EngineCore: the synchronous heart. ``step()`` = schedule -> run -> update -> deltas.

Token ids only: no text, no JSON, no asyncio. The async engine owns the thread this runs
on and is the only caller, so nothing here needs a lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rillet.engine.inputs import check_prompt_length
from rillet.engine.model_runner import ModelRunner, StepResult
from rillet.engine.rates import EngineRates
from rillet.engine.request import Request
from rillet.engine.scheduler import ScheduledRequest, Scheduler
from rillet.engine.speculation import DraftTiming
from rillet.errors import RilletError
from rillet.protocol import EngineRequest, FinishReason, TokenDelta


@dataclass
class EngineCounters:
    """Monotonic counters since start (tests and /metrics read them)."""

    num_steps: int = 0
    num_computed_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0


class EngineCore:
    """Continuous batching over one model. Requests join and leave at every step."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, max_model_len: int) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.counters = EngineCounters()
        #: Measured prefill rate and step time (the server's deadlines predict from them).
        self.rates = EngineRates()
        #: The requests of the step being run (empty between steps).
        self.executing: list[str] = []
        #: Requests a step ended with an error of their own (already freed); the loop
        #: takes them with :meth:`take_failed` and reports them.
        self._failed: list[tuple[str, RilletError]] = []

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; its cap is cut to the room left in the context (None = all of it).

        Callers check their requests before they get here (``inputs.build_request``, the
        server's service); this guard only keeps a bad one from reaching the scheduler, and
        fails that request alone (a ValidationError, in neutral words).
        """
        num_prompt = len(request.prompt_token_ids)
        check_prompt_length(num_prompt, self.max_model_len)
        room = self.max_model_len - num_prompt
        wanted = request.params.max_new_tokens
        cap = room if wanted is None else min(wanted, room)
        core_request = Request.from_engine_request(request, cap)
        self.scheduler.add_request(core_request)
        try:
            self.runner.add_request(core_request)
        except RilletError:
            self.scheduler.finish_request(request.request_id, FinishReason.ABORT)
            raise

    def abort_request(self, request_id: str) -> None:
        """Free everything the request holds, now. Unknown or finished ids are ignored."""
        self.scheduler.abort_request(request_id)
        self.runner.release(request_id)

    def finish_request(self, request_id: str, reason: FinishReason) -> None:
        """End a request the front half decided is done (a stop string matched)."""
        self.scheduler.finish_request(request_id, reason)
        self.runner.release(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[TokenDelta]:
        """Run one engine step and return a delta for every request it advanced or finished."""
        scheduled = self.scheduler.schedule()
        self.counters.num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            return []
        # If the forward raises, these (and only these) requests are in an unknown state.
        self.executing = [s.request.request_id for s in scheduled.scheduled]
        started = time.perf_counter()
        result = self.runner.execute(scheduled)
        duration = time.perf_counter() - started
        self.executing = []
        for request_id, error in result.failed.items():
            # Ended here, so update_from_output skips it (it is no longer running).
            self.scheduler.finish_request(request_id, FinishReason.ABORT)
            self.runner.release(request_id)
            self._failed.append((request_id, error))
        rows = scheduled.scheduled
        # Speculation learns from steps of decode rows only: a prompt chunk's time says
        # nothing about what drafting costs or makes.
        speculating = self.scheduler.speculator is not None and bool(rows)
        decode_only = speculating and all(s.is_decode for s in rows)
        num_drafts = sum(len(s.draft_token_ids) for s in rows) if decode_only else 0
        timing = self._observe_draft_cost(rows, duration, decode_only, num_drafts)
        updated = self.scheduler.update_from_output(scheduled, result.sampled)
        num_tokens = sum(r.num_step_tokens for r in updated)
        self.counters.num_generated_tokens += num_tokens
        if decode_only:
            self._observe_step_rate(len(rows), num_drafts, num_tokens, duration, timing)
        num_prefill = self._count(scheduled.scheduled)
        self.rates.observe(num_prefill, duration)
        return [self._delta(request, result) for request in updated]

    def take_failed(self) -> list[tuple[str, RilletError]]:
        """The requests steps have ended with an error since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def _observe_step_rate(
        self,
        batch: int,
        num_drafts: int,
        num_tokens: int,
        duration: float,
        timing: DraftTiming | None,
    ) -> None:
        """Tell the speculator what a step of decode rows only made and took (the rate
        gate, ``engine/spec_rates.py``), less the draft model's catch-up on tokens it had
        not seen (a first prompt, or the tokens since a pause: not what drafting costs)."""
        spec = self.scheduler.speculator
        if spec is None:
            return
        catch_up = timing.seconds - timing.decode_seconds if timing is not None else 0.0
        spec.observe_step(batch, num_drafts, num_tokens, duration - catch_up, catch_up)

    def _observe_draft_cost(
        self,
        rows: list[ScheduledRequest],
        duration: float,
        decode_only: bool,
        num_drafts: int,
    ) -> DraftTiming | None:
        """Tell the speculator what the draft model's forwards cost against the target's,
        from a step of decode rows only (a prompt chunk would lengthen the target's part);
        returns the draft model's timing of the step (None: no draft model)."""
        drafter, spec = self.runner.drafter, self.scheduler.speculator
        if drafter is None or spec is None:
            return None
        timing = drafter.take_timing()
        if not timing.num_decode_forwards or not decode_only:
            return timing
        spec.observe_draft_forwards(
            timing.decode_seconds / timing.num_decode_forwards,
            duration - timing.seconds,
            num_drafts,
            sum(s.request.num_tokens for s in rows) // len(rows),
        )
        return timing

    def _count(self, scheduled: list[ScheduledRequest]) -> int:
        """Count the step; returns the prompt tokens it computed."""
        c = self.counters
        c.num_steps += 1
        num_prefill = 0
        for s in scheduled:
            c.num_computed_tokens += s.num_new_tokens
            prompt_end = s.request.num_prompt_tokens
            num_prefill += max(
                0, min(s.start_position + s.num_new_tokens, prompt_end) - s.start_position
            )
        c.num_prompt_tokens_computed += num_prefill
        return num_prefill

    def _delta(self, request: Request, result: StepResult) -> TokenDelta:
        rid = request.request_id
        # The tokens the scheduler appended: the model's at each kept position (a stop
        # token or the length cap may end a speculative row's run early).
        n = request.num_step_tokens
        new_token_ids = request.output_token_ids[-n:] if n else []
        delta = TokenDelta(
            request_id=rid,
            new_token_ids=new_token_ids,
            finish_reason=request.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
            first_scheduled_time=request.first_scheduled_time,
            step=self.counters.num_steps,
        )
        if new_token_ids and request.num_output_tokens == len(new_token_ids):
            # The monotonic clock, as first_scheduled_time: the server's, in every process.
            delta.first_token_time = time.monotonic()
        if rid in result.logprobs:
            delta.logprobs = result.logprobs[rid][:n]
        if rid in result.top_logprobs:
            delta.top_logprobs = result.top_logprobs[rid][:n]
        if rid in result.prompt_logprobs:
            delta.prompt_logprobs = result.prompt_logprobs[rid]
        if request.finish_reason is not None:
            self.runner.release(rid)
        return delta
