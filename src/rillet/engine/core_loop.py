"""The loop that drives an EngineCore: apply commands, step, report. Token ids only.

The same loop runs on the engine thread of an in-process engine and as the main loop of
an engine process (``engine_process.py``); what differs is only where commands come from
(a queue or a pipe) and where reports go (straight to the front end's collectors, or down
the pipe). Keeping one loop keeps one set of rules: commands are applied between steps,
so an abort frees a request's blocks before the next step; a failed forward fails only the
requests it ran and the loop serves on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from rillet.errors import GenerationError, RilletError
from rillet.protocol import EngineRequest, FinishReason, TokenDelta

if TYPE_CHECKING:  # the core imports torch; a server's own process needs none of it
    from rillet.engine.core import EngineCore

log = logging.getLogger("rillet.engine")

#: How long an idle loop waits for a command before looking again (it wakes at once
#: when one arrives; the timeout only bounds how long a lost wake-up could cost).
IDLE_POLL_S = 0.5

CommandKind = Literal["add", "abort", "finish", "stop"]
#: ``("add", EngineRequest)``, ``("abort", request_id)`` (the consumer went away),
#: ``("finish", request_id)`` (the front end matched a stop string), ``("stop", None)``.
Command = tuple[CommandKind, object]
#: Waits up to the given seconds (0: not at all) for commands; returns those available.
ReceiveCommands = Callable[[float], list[Command]]


@dataclass
class EngineStats:
    """A snapshot for /metrics and tests."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_used_blocks: int
    num_prefix_hit_tokens: int
    num_computed_tokens: int
    num_prompt_tokens_computed: int
    num_generated_tokens: int
    num_preemptions: int
    num_steps: int
    #: Prompt tokens still to prefill for the requests queued or prefilling now.
    num_queued_prompt_tokens: int = 0
    #: Moving averages of the core's speed (``engine/rates.py``); 0.0 until measured.
    prefill_tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    #: Speculative decoding, per proposer (empty when off): drafts proposed, and accepted.
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    num_accepted_tokens: dict[str, int] = field(default_factory=dict)


def engine_stats(core: EngineCore) -> EngineStats:
    sched = core.scheduler
    bm = sched.block_manager
    spec = sched.speculator
    c = core.counters
    return EngineStats(
        num_running=sched.num_running,
        num_waiting=sched.num_waiting,
        kv_cache_usage=bm.usage,
        num_used_blocks=bm.num_used_blocks,
        num_prefix_hit_tokens=bm.num_prefix_hit_tokens,
        num_computed_tokens=c.num_computed_tokens,
        num_prompt_tokens_computed=c.num_prompt_tokens_computed,
        num_generated_tokens=c.num_generated_tokens,
        num_preemptions=c.num_preemptions,
        num_steps=c.num_steps,
        num_queued_prompt_tokens=sched.num_queued_prompt_tokens,
        prefill_tokens_per_s=core.rates.prefill_tokens_per_s,
        step_time_s=core.rates.step_time_s,
        num_draft_tokens=dict(spec.counters.num_draft_tokens) if spec else {},
        num_accepted_tokens=dict(spec.counters.num_accepted_tokens) if spec else {},
    )


class Reporter(Protocol):
    """Where the loop's results go."""

    def step(self, deltas: list[TokenDelta]) -> list[str]:
        """Called after every pass that changed something (``deltas`` may be empty).

        Returns the ids of requests a stop string has ended; the loop finishes them.
        """
        ...

    def errors(self, failed: list[tuple[str, RilletError]]) -> None:
        """Requests that ended with an error; the loop has already freed them."""
        ...


class CoreLoop:
    """``receive commands -> apply -> step -> report`` until a ``stop`` command."""

    def __init__(self, core: EngineCore, receive: ReceiveCommands, reporter: Reporter) -> None:
        self.core = core
        self._receive = receive
        self._reporter = reporter

    def run(self) -> None:
        core = self.core
        while True:
            busy = core.has_unfinished_requests()
            commands = self._receive(0.0 if busy else IDLE_POLL_S)
            failed: list[tuple[str, RilletError]] = []
            for kind, payload in commands:
                if kind == "stop":
                    return
                self._apply(kind, payload, failed)
            if failed:
                self._reporter.errors(failed)
            if core.has_unfinished_requests():
                self._step()
            elif commands:
                self._reporter.step([])  # e.g. an abort while idle: let stats catch up

    def _apply(
        self, kind: CommandKind, payload: object, failed: list[tuple[str, RilletError]]
    ) -> None:
        if kind == "add":
            assert isinstance(payload, EngineRequest)
            try:
                self.core.add_request(payload)
            except RilletError as exc:
                failed.append((payload.request_id, exc))
        elif kind == "abort":
            assert isinstance(payload, str)
            self.core.abort_request(payload)
        elif kind == "finish":
            assert isinstance(payload, str)
            self.core.finish_request(payload, FinishReason.STOP_SEQUENCE)

    def _step(self) -> None:
        try:
            stop_hits = self._reporter.step(self.core.step())
            ended = self.core.take_failed()
            if ended:  # e.g. a grammar that allows no next token: one error each
                self._reporter.errors(ended)
        except Exception as exc:
            # A failed forward poisons only the requests it ran: fail them, free their blocks
            # (their KV is never entered in the prefix cache: that happens after a forward
            # succeeds), and keep serving the rest. A failure anywhere else in the step leaves
            # the batch unknown: fail every request in flight.
            log.exception("engine step failed")
            failed = self.core.executing or self.core.scheduler.request_ids()
            self.core.executing = []
            self._fail(failed, GenerationError(f"generation failed: {exc}"))
            return
        for request_id in stop_hits:
            self.core.finish_request(request_id, FinishReason.STOP_SEQUENCE)

    def _fail(self, failed: list[str], error: RilletError) -> None:
        for request_id in failed:
            self.core.abort_request(request_id)
        self._reporter.errors([(request_id, error) for request_id in failed])
