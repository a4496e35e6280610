"""``rillet.LLM``: offline batch generation on the same engine the server streams from.

It runs the very loop and text path the server runs (``CoreLoop`` with a
``TextReporter``), on this thread, until every prompt is done: the stop-string rule and the
merging of outputs are the served ones, so tests that go through ``LLM`` cover them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rillet.config import EngineConfig
from rillet.engine.builder import build_engine
from rillet.engine.core_loop import Command, CoreLoop
from rillet.engine.inputs import build_request
from rillet.engine.output_processor import OutputProcessor, TextReporter
from rillet.protocol import EngineRequest, FinishReason, GeneratedToken, PromptToken, RequestOutput
from rillet.sampling import SamplingParams


@dataclass
class Completion:
    """The whole result of one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    tokens: list[GeneratedToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    num_cached_tokens: int = 0
    prompt_tokens: list[PromptToken] | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]


class LLM:
    """Load a model once, then ``generate`` many prompts in one continuous batch.

    >>> llm = LLM()                     # the bundled SmolLM2-135M-Instruct
    >>> llm.generate(["Hello"], SamplingParams(max_new_tokens=8))[0].text
    """

    def __init__(self, model: str | None = None, **engine_options: object) -> None:
        self.config = EngineConfig.from_env(model=model, **engine_options)
        self.parts = build_engine(self.config)
        self.core = self.parts.core
        self.tokenizer = self.parts.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion; results come back in prompt order.

        Raises the first request's error if any request failed (a RilletError).
        """
        prompt_list: list[str | Sequence[int]] = (
            [prompts] if isinstance(prompts, str) else list(prompts)
        )
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(params)
        requests = [
            build_request(
                self.tokenizer,
                self.parts.model_config.vocab_size,
                self.parts.max_model_len,
                prompt,
                p,
            )
            for prompt, p in zip(prompt_list, params_list, strict=True)
        ]
        merged, failures = self._run(requests)
        for request in requests:
            if request.request_id in failures:
                raise failures[request.request_id]
        return [_completion(request, merged[request.request_id]) for request in requests]

    def _run(
        self, requests: list[EngineRequest]
    ) -> tuple[dict[str, RequestOutput], dict[str, BaseException]]:
        merged: dict[str, RequestOutput] = {}
        failures: dict[str, BaseException] = {}

        def deliver(items: Sequence[tuple[str, RequestOutput | BaseException]]) -> None:
            for request_id, item in items:
                if isinstance(item, BaseException):
                    failures[request_id] = item
                elif request_id in merged:
                    merged[request_id].merge(item)
                else:
                    merged[request_id] = item

        processor = OutputProcessor(self.tokenizer)
        pending: list[Command] = []
        for request in requests:
            processor.add(request)
            pending.append(("add", request))

        def receive(timeout: float) -> list[Command]:
            if pending:
                commands = list(pending)
                pending.clear()
                return commands
            return [] if self.core.has_unfinished_requests() else [("stop", None)]

        CoreLoop(self.core, receive, TextReporter(processor, deliver)).run()
        return merged, failures


def _completion(request: EngineRequest, out: RequestOutput) -> Completion:
    return Completion(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        text=out.text,
        tokens=out.tokens,
        finish_reason=out.finish_reason,
        stop_sequence=out.stop_sequence,
        num_cached_tokens=out.num_cached_tokens,
        prompt_tokens=out.prompt_tokens,
    )
