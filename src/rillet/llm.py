"""``rillet.LLM``: offline batch generation on the same engine the server streams from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rillet.config import EngineConfig
from rillet.engine.builder import build_engine
from rillet.engine.inputs import build_request
from rillet.engine.output_processor import OutputProcessor
from rillet.protocol import FinishReason, GeneratedToken, PromptToken
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
        """Run every prompt to completion; results come back in prompt order."""
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
        processor = OutputProcessor(self.tokenizer)
        results = {r.request_id: Completion(r.request_id, r.prompt_token_ids) for r in requests}
        for request in requests:
            self.core.add_request(request)
            processor.add(request)
        while self.core.has_unfinished_requests():
            step = processor.process(self.core.step())
            for rid in step.stop_hits:
                self.core.finish_request(rid, FinishReason.STOP_SEQUENCE)
            for out in step.outputs:
                done = results[out.request_id]
                done.text += out.text
                done.tokens.extend(out.tokens)
                done.finish_reason = out.finish_reason
                done.stop_sequence = out.stop_sequence or done.stop_sequence
                done.num_cached_tokens = out.num_cached_tokens
                if out.prompt_tokens is not None:
                    done.prompt_tokens = out.prompt_tokens
        return [results[r.request_id] for r in requests]
