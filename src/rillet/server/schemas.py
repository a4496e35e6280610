"""Request bodies of the TGI and OpenAI routes, lenient as real servers are (§9.8).

Unknown keys are ignored (TGI has no ``deny_unknown_fields``; vLLM uses ``extra="allow"``),
every optional field accepts ``null``, and ``stop`` may be a string or a list. Rules about
values (ranges, combinations) live in the route modules, which know the route's semantics;
these models only fix shapes and types.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


Stop = str | list[str] | None


def stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# ---- TGI -------------------------------------------------------------------------------


class GenerateParameters(_Lenient):
    """TGI's ``GenerateParameters`` (``router/src/lib.rs``)."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: Stop = None
    truncate: int | None = None
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None


class GenerateRequest(_Lenient):
    """``/generate``, ``/generate_stream``, ``/tokenize`` and (with ``stream``) ``/``.

    ``parameters`` omitted entirely is not the same as ``{}``: TGI then samples
    (``default_parameters()`` has ``do_sample: true``).
    """

    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool | None = None


# ---- OpenAI ----------------------------------------------------------------------------


class StreamOptions(_Lenient):
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


class OpenAICommon(_Lenient):
    """Fields shared by chat and completions, OpenAI's and vLLM's extras included."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
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


class ChatCompletionRequest(OpenAICommon):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None


class CompletionRequest(OpenAICommon):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
