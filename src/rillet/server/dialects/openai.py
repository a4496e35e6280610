"""OpenAI's dialect: chat and completions bodies in, as OpenAI and vLLM read them.

Defaults are OpenAI's: ``temperature`` 1.0 (sampling; 0 is greedy), ``top_p`` 1.0, chat
``max_completion_tokens``/``max_tokens`` up to the context, completions ``max_tokens`` 16.
vLLM's extras that benchmark tools send are honoured (``ignore_eos``, ``min_tokens``,
``top_k`` with -1 = off, ``min_p``, ``repetition_penalty``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``), and llama-server's per-request
``speculative.n_max`` (draft tokens per step, capped by ``--num-speculative-tokens``). What
we cannot do is refused with a 400 rather than silently ignored: ``n``/``best_of`` > 1,
several prompts, ``suffix``, a non-empty ``logit_bias``, non-text content parts.
``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` and its older
``guided_*`` fields constrain the output on chat and completions alike (``structured.py``).
Chat takes ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (``tools.py``), and tool
turns in ``messages``.

The response side (chunks, answers, errors) is in ``openai_render.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.dialects.fields import Lenient, SpeculativeCap, Stop, stop_list
from rillet.server.dialects.structured import body_constraint
from rillet.server.dialects.tools import ToolPlan, check_history, plan_tools
from rillet.server.limits import FieldNames
from rillet.server.sampling_defaults import DEFAULTABLE
from rillet.server.spec import ChatPrompt, GenerationSpec

if TYPE_CHECKING:
    from rillet.tokenizer import Tokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
CHAT_FIELDS = FieldNames(prompt="messages", max_new_tokens="max_tokens")
COMPLETION_FIELDS = FieldNames(prompt="prompt", max_new_tokens="max_tokens")


class StreamOptions(Lenient):
    #: vLLM: when the object is present, usage is included unless said otherwise.
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SamplingFields(SpeculativeCap):
    """OpenAI's sampling fields with vLLM's extras and llama-server's ``speculative.n_max``;
    the WebSocket's frames use them too."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras that benchmark tools send.
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    best_of: int | None = None
    # Output constraints (structured.py): OpenAI's, vLLM's and vLLM's older names.
    response_format: dict[str, Any] | str | None = None
    structured_outputs: dict[str, Any] | str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | str | None = None
    guided_grammar: str | None = None


class OpenAICommon(SamplingFields):
    """Fields shared by chat and completions."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(OpenAICommon):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = None


class CompletionRequest(OpenAICommon):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


@dataclass
class OpenAIPlan:
    spec: GenerationSpec
    chat: bool
    stream: bool
    include_usage: bool
    #: ``stream_options.continuous_usage_stats`` (vLLM): cumulative ``usage`` on every chunk.
    continuous_usage: bool
    #: Chat: per-token logprobs wanted. Completions: ``logprobs`` is not None.
    logprobs: bool
    #: Completions ``echo``: the prompt text that starts the answer.
    echo: str = ""
    #: Chat with tools: how the answer's tool calls are parsed and sent.
    tools: ToolPlan | None = None


def plan_chat(body: ChatCompletionRequest) -> OpenAIPlan:
    """Validate a chat request and map it (the service renders the chat template)."""
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("`logprobs` must be true when `top_logprobs` is used")
    add_generation_prompt = (
        True if body.add_generation_prompt is None else body.add_generation_prompt
    )
    messages = [message_dict(m) for m in body.messages]
    check_history(messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling_params(body, max_tokens, bool(body.logprobs), body.top_logprobs or 0)
    tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    if tools is not None and tools.constraint is not None:
        if params.constraint is not None:
            raise ValidationError(
                "`response_format` / `structured_outputs` cannot be combined with `tools` "
                'unless `tool_choice` is "none"'
            )
        params = replace(params, constraint=tools.constraint)
    chat = ChatPrompt(messages, add_generation_prompt, tools=None if tools is None else tools.tools)
    return OpenAIPlan(
        GenerationSpec(chat, params, names=CHAT_FIELDS, unset=unset_fields(body)),
        chat=True,
        stream=bool(body.stream),
        include_usage=_include_usage(body),
        continuous_usage=_continuous_usage(body),
        logprobs=bool(body.logprobs),
        tools=tools,
    )


def plan_completion(body: CompletionRequest, tokenizer: Tokenizer) -> OpenAIPlan:
    if body.suffix:
        raise ValidationError("`suffix` is not supported")
    prompt = _single_prompt(body.prompt)
    if body.logprobs is not None and body.logprobs < 0:
        raise ValidationError("`logprobs` must be a non-negative integer")
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = sampling_params(body, max_tokens, body.logprobs is not None, body.logprobs or 0)
    echo = ""
    if body.echo:
        echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    return OpenAIPlan(
        GenerationSpec(prompt, params, names=COMPLETION_FIELDS, unset=unset_fields(body)),
        chat=False,
        stream=bool(body.stream),
        include_usage=_include_usage(body),
        continuous_usage=_continuous_usage(body),
        logprobs=body.logprobs is not None,
        echo=echo,
    )


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as the chat template sees it: text parts joined, no ``null`` content."""
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


def _continuous_usage(body: OpenAICommon) -> bool:
    """vLLM's rule: continuous usage needs ``include_usage`` as well (its default)."""
    options = body.stream_options
    return _include_usage(body) and options is not None and bool(options.continuous_usage_stats)


def unset_fields(body: SamplingFields) -> frozenset[str]:
    """The defaultable sampling fields this body leaves unset (``sampling_defaults.py``)."""
    return frozenset(name for name in DEFAULTABLE if getattr(body, name) is None)


def sampling_params(
    body: SamplingFields, max_tokens: int | None, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """OpenAI's (and vLLM's) sampling fields as engine params, the output constraint
    included."""
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
        constraint=body_constraint(dict(body)),
        num_speculative_tokens=body.speculative_n_max,
    )
