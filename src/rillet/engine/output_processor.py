"""The one loop over a step's outputs: core TokenDeltas -> RequestOutputs with text.

It owns each request's text state (incremental detokenizer + stop-string matcher) and
tells its caller which requests hit a stop string, so the core can stop them: the core
itself never sees text. :class:`TextReporter` is the core loop's reporter for every front
end that keeps text: the served ``AsyncEngine`` and the offline ``LLM`` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rillet.engine.detokenizer import RequestTextState
from rillet.errors import RilletError
from rillet.protocol import EngineRequest, RequestOutput, TokenDelta
from rillet.tokenizer import Tokenizer


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput] = field(default_factory=list)
    stop_hits: list[str] = field(default_factory=list)


class OutputProcessor:
    """Per-request text state, created on add and dropped when the request ends."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, RequestTextState] = {}

    def add(self, request: EngineRequest) -> None:
        self._states[request.request_id] = RequestTextState(
            self.tokenizer, request.prompt_token_ids, request.params
        )

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, deltas: list[TokenDelta]) -> ProcessedStep:
        step = ProcessedStep()
        for delta in deltas:
            state = self._states.get(delta.request_id)
            if state is None:  # aborted while the step ran
                continue
            out = state.process(delta)
            if out is None:  # a step that ran after a stop string had already ended it
                continue
            out.first_scheduled_time = delta.first_scheduled_time
            out.first_token_time = delta.first_token_time
            out.step = delta.step
            if state.stop_hit:
                step.stop_hits.append(delta.request_id)
            if out.finished:
                self.drop(delta.request_id)
            step.outputs.append(out)
        return step


#: Where a front end's results go: ``(request_id, output or the request's error)`` pairs.
Deliver = Callable[[Sequence[tuple[str, RequestOutput | BaseException]]], None]


class TextReporter:
    """The core loop's ``Reporter``: deltas become text outputs for ``deliver``, and the
    requests a stop string ended go back to the loop, which finishes them in the core."""

    def __init__(self, processor: OutputProcessor, deliver: Deliver) -> None:
        self.processor = processor
        self._deliver = deliver

    def step(self, deltas: list[TokenDelta]) -> list[str]:
        if not deltas:
            return []
        processed = self.processor.process(deltas)
        self._deliver([(out.request_id, out) for out in processed.outputs])
        return processed.stop_hits

    def errors(self, failed: list[tuple[str, RilletError]]) -> None:
        for request_id, _ in failed:
            self.processor.drop(request_id)
        self._deliver(failed)
