"""The one loop over a step's outputs: core TokenDeltas -> RequestOutputs with text.

It owns each request's text state (incremental detokenizer + stop-string matcher) and
tells its caller which requests hit a stop string, so the core can stop them: the core
itself never sees text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rillet.engine.detokenizer import RequestTextState
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
            if state.stop_hit:
                step.stop_hits.append(delta.request_id)
            if out.finished:
                self.drop(delta.request_id)
            step.outputs.append(out)
        return step
