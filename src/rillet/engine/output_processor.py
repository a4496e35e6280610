"""The one loop over a step's outputs: core TokenDeltas -> RequestOutputs with text.

It owns each request's text state (incremental detokenizer + stop-string matcher) and
tells its caller which requests hit a stop string, so the core can stop them: the core
itself never sees text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rillet.engine.detokenizer import RequestTextState
from rillet.protocol import EngineRequest, PromptToken, RequestOutput, TokenDelta
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
        self._num_prompt_tokens: dict[str, int] = {}

    def add(self, request: EngineRequest) -> None:
        self._states[request.request_id] = RequestTextState(
            self.tokenizer, request.prompt_token_ids, request.params
        )
        self._num_prompt_tokens[request.request_id] = len(request.prompt_token_ids)

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self._num_prompt_tokens.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, deltas: list[TokenDelta]) -> ProcessedStep:
        step = ProcessedStep()
        for delta in deltas:
            state = self._states.get(delta.request_id)
            if state is None:  # aborted while the step ran
                continue
            out = state.process(delta)
            out.num_prompt_tokens = self._num_prompt_tokens[delta.request_id]
            if delta.prompt_logprobs is not None:
                out.prompt_tokens = self._prompt_tokens(state.prompt_token_ids, delta)
            if state.stop_hit:
                step.stop_hits.append(delta.request_id)
            if out.finished:
                self.drop(delta.request_id)
            step.outputs.append(out)
        return step

    def _prompt_tokens(self, prompt_ids: list[int], delta: TokenDelta) -> list[PromptToken]:
        logprobs = delta.prompt_logprobs or []
        return [
            PromptToken(
                id=tid,
                text=self.tokenizer.decode([tid], skip_special_tokens=False),
                logprob=logprobs[i] if i < len(logprobs) else None,
            )
            for i, tid in enumerate(prompt_ids)
        ]
