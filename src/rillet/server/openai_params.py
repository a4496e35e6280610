"""OpenAI chat/completions bodies -> a validated engine request, as OpenAI and vLLM read them.

Defaults are OpenAI's: ``temperature`` 1.0 (sampling; 0 is greedy), ``top_p`` 1.0, chat
``max_completion_tokens``/``max_tokens`` up to the context, completions ``max_tokens`` 16.
vLLM's extras that benchmark tools send are honoured (``ignore_eos``, ``min_tokens``,
``top_k`` with -1 = off, ``min_p``, ``repetition_penalty``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``). What we cannot do is refused with a
400 rather than silently ignored: ``n``/``best_of`` > 1, several prompts, ``suffix``, a
non-empty ``logit_bias``, tools, structured output, non-text content parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rillet.errors import ValidationError
from rillet.protocol import EngineRequest
from rillet.sampling import SamplingParams
from rillet.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAICommon,
    stop_list,
)
from rillet.server.state import ServerState

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class OpenAIPlan:
    request: EngineRequest
    stream: bool
    include_usage: bool
    #: Chat: per-token logprobs wanted. Completions: ``logprobs`` is not None.
    logprobs: bool
    #: Completions ``echo``: the prompt text that starts the answer.
    echo: str = ""


def plan_chat(state: ServerState, body: ChatCompletionRequest) -> OpenAIPlan:
    """Validate a chat request, render the chat template, build the engine request."""
    if body.tools and body.tool_choice != "none":
        raise ValidationError("tools are not supported by this server")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise ValidationError("`response_format` other than text is not supported")
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("`logprobs` must be true when `top_logprobs` is used")
    messages = [_message(m) for m in body.messages]
    add_generation_prompt = (
        True if body.add_generation_prompt is None else body.add_generation_prompt
    )
    prompt = state.engine.tokenizer.apply_chat_template(messages, add_generation_prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _sampling(body, max_tokens, bool(body.logprobs), body.top_logprobs or 0)
    # The template already carries BOS where the model wants one (transformers does the same).
    request = _make_request(state, prompt, params, add_special_tokens=False)
    return OpenAIPlan(request, bool(body.stream), _include_usage(body), bool(body.logprobs))


def plan_completion(state: ServerState, body: CompletionRequest) -> OpenAIPlan:
    if body.suffix:
        raise ValidationError("`suffix` is not supported")
    prompt = _single_prompt(body.prompt)
    if body.logprobs is not None and body.logprobs < 0:
        raise ValidationError("`logprobs` must be a non-negative integer")
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = _sampling(body, max_tokens, body.logprobs is not None, body.logprobs or 0)
    request = _make_request(state, prompt, params, add_special_tokens=True)
    echo = ""
    if body.echo:
        echo = prompt if isinstance(prompt, str) else state.engine.tokenizer.decode(prompt)
    return OpenAIPlan(
        request, bool(body.stream), _include_usage(body), body.logprobs is not None, echo
    )


def _message(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.type != "text" or part.text is None:
                raise ValidationError(f"content parts of type {part.type!r} are not supported")
        content = "".join(part.text or "" for part in content)
    out = message.model_dump(exclude_none=True)
    out["content"] = content or ""
    return out


def _single_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(t, int) for t in prompt):
        return [int(t) for t in prompt]  # type: ignore[arg-type]
    if len(prompt) != 1:
        raise ValidationError("exactly one prompt per request is supported")
    only = prompt[0]
    return only if isinstance(only, str) else list(only)  # type: ignore[arg-type]


def _include_usage(body: OpenAICommon) -> bool:
    return body.stream_options is not None and bool(body.stream_options.include_usage)


def _sampling(
    body: OpenAICommon, max_tokens: int | None, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    if body.n not in (None, 1) or body.best_of not in (None, 1):
        raise ValidationError("`n` and `best_of` must be 1: this server returns one choice")
    if body.logit_bias:
        raise ValidationError("`logit_bias` is not supported")
    top_k = body.top_k or 0
    return SamplingParams(
        max_new_tokens=max_tokens,
        min_tokens=body.min_tokens or 0,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
        top_p=body.top_p if body.top_p is not None else 1.0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
        stop=stop_list(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=body.skip_special_tokens is not False,
    )


def _make_request(
    state: ServerState, prompt: str | list[int], params: SamplingParams, add_special_tokens: bool
) -> EngineRequest:
    if params.max_new_tokens is not None and params.max_new_tokens <= 0:
        raise ValidationError("`max_tokens` must be at least 1")
    request = state.engine.make_request(prompt, params, add_special_tokens=add_special_tokens)
    num_prompt = len(request.prompt_token_ids)
    if num_prompt > state.max_input_tokens:
        raise ValidationError(
            f"the prompt has {num_prompt} tokens; this server accepts at most "
            f"{state.max_input_tokens}"
        )
    room = state.max_total_tokens - num_prompt
    if params.max_new_tokens is None:
        params.max_new_tokens = room
    elif params.max_new_tokens > room:
        raise ValidationError(
            f"this model's maximum context length is {state.max_total_tokens} tokens; you "
            f"requested {num_prompt + params.max_new_tokens} ({num_prompt} in the prompt, "
            f"{params.max_new_tokens} for the completion)"
        )
    return request
