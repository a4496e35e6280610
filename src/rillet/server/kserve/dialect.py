"""The KServe v2 / Triton dialect, with vLLM-backend tensor names; no transport here.

Both Triton doors use it: gRPC (``ModelInfer``, ``ModelStreamInfer``) and Triton's HTTP
``generate`` / ``generate_stream``. Each decodes its frames into a :class:`KServeRequest`
(tensors as Python values) and gets back a plan; ``render.py`` makes the outputs to send.

Inputs, as vLLM's Triton backend reads them (``src/model.py``, ``src/utils/request.py``):
``text_input`` (BYTES, the prompt), ``stream`` (BOOL, default false),
``sampling_parameters`` (BYTES, a JSON object with OpenAI/vLLM field names; values may be
strings, as the backend's own client sends them; without it the request's parameters are
read the same way; ``response_format``, ``structured_outputs`` and ``guided_*`` constrain
the output as on the OpenAI routes, an object given as JSON text),
``exclude_input_in_output`` (BOOL; default true when streaming, false otherwise, when the
prompt starts the one answer) and ``return_finish_reason``,
``return_num_input_tokens``, ``return_num_output_tokens``, ``return_logprobs``,
``return_cumulative_logprob`` (BOOL). rillet adds ``messages`` (BYTES, a JSON list of chat
messages, rendered with the model's chat template on the server) for clients that chat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydantic

from rillet.errors import NotFoundError, ValidationError
from rillet.server.dialects.fields import first_problem, json_loads
from rillet.server.dialects.openai import SamplingFields, sampling_params, unset_fields
from rillet.server.limits import FieldNames
from rillet.server.spec import ChatPrompt, GenerationSpec

KSERVE_FIELDS = FieldNames(prompt="text_input", max_new_tokens="max_tokens")
#: vLLM's SamplingParams default, which its Triton backend keeps.
DEFAULT_MAX_TOKENS = 16
#: The model answers to its served name and to this suffix of it, as NuPIC's
#: ``StreamingClient`` names a streaming model (``<model>.streaming``).
STREAMING_SUFFIX = ".streaming"
#: Parameters Triton keeps for itself; never sampling fields.
_RESERVED = {
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "headers",
    "binary_data_output",
}
EMPTY_FINAL = "triton_enable_empty_final_response"
RETURNS = {
    "return_finish_reason": "finish_reason",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
    "return_logprobs": "logprobs",
    "return_cumulative_logprob": "cumulative_logprob",
}
#: (name, datatype, shape) of every input and output, for metadata and config.
INPUTS = [
    ("text_input", "BYTES", [1]),
    ("messages", "BYTES", [1]),
    ("stream", "BOOL", [1]),
    ("sampling_parameters", "BYTES", [1]),
    ("exclude_input_in_output", "BOOL", [1]),
    *[(name, "BOOL", [1]) for name in RETURNS],
]
OUTPUTS = [
    ("text_output", "BYTES", [-1]),
    ("finish_reason", "BYTES", [-1]),
    ("num_input_tokens", "UINT32", [1]),
    ("num_output_tokens", "UINT32", [-1]),
    ("logprobs", "BYTES", [-1]),
    ("cumulative_logprob", "FP32", [-1]),
]
_KNOWN_INPUTS = {name for name, _, _ in INPUTS}


@dataclass
class KServeRequest:
    """A decoded request: each input tensor's elements, and the request's parameters."""

    id: str
    model_name: str
    inputs: dict[str, list[Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    requested_outputs: list[str] = field(default_factory=list)


@dataclass
class KServePlan:
    spec: GenerationSpec
    stream: bool
    #: The prompt text the one non-streamed answer starts with ("" when excluded).
    echo: str
    #: The outputs this request gets besides ``text_output``.
    returns: list[str]
    #: Send the final flag on an empty response of its own (Triton's opt-in).
    empty_final: bool
    requested_outputs: list[str]


class _Sampling(SamplingFields):
    """vLLM's SamplingParams fields; strings are cast ("0.1" -> 0.1), as its backend does."""

    model_config = pydantic.ConfigDict(extra="ignore", coerce_numbers_to_str=False)


def model_names(served: str) -> tuple[str, str]:
    return served, served + STREAMING_SUFFIX


def check_model(request_model: str, served: str) -> None:
    if request_model not in model_names(served):
        raise NotFoundError(f"unknown model {request_model!r}; this server serves {served!r}")


def plan(request: KServeRequest, *, one_response: bool = False) -> KServePlan:
    """Validate and map a request (ValidationError names the input that is wrong).

    ``one_response``: the door answers once (gRPC ``ModelInfer``, HTTP ``generate``), so a
    request that asks to stream is refused, as Triton refuses it for a decoupled model.
    """
    unknown = sorted(set(request.inputs) - _KNOWN_INPUTS)
    if unknown:
        raise ValidationError(
            f"unexpected input(s) {unknown}; this model takes {sorted(_KNOWN_INPUTS)}"
        )
    prompt = _prompt(request)
    stream = _flag(request, "stream", False)
    if stream and one_response:
        raise ValidationError(
            "`stream` = true needs a streaming endpoint (ModelStreamInfer, generate_stream): "
            "this one answers exactly once"
        )
    exclude_given = "exclude_input_in_output" in request.inputs
    exclude = _flag(request, "exclude_input_in_output", stream)
    if stream and exclude_given and not exclude:
        raise ValidationError("When streaming, `exclude_input_in_output` = False is not allowed.")
    empty_final = request.parameters.get(EMPTY_FINAL, False)
    if not isinstance(empty_final, bool):
        raise ValidationError(f"parameter {EMPTY_FINAL!r} must be a bool")
    fields = _sampling_fields(request)
    max_tokens = fields.max_tokens if fields.max_tokens is not None else DEFAULT_MAX_TOKENS
    logprobs = _flag(request, "return_logprobs", False) or _flag(
        request, "return_cumulative_logprob", False
    )
    params = sampling_params(fields, max_tokens, logprobs, 0)
    echo = "" if exclude or isinstance(prompt, ChatPrompt) else prompt
    returns = [output for flag, output in RETURNS.items() if _flag(request, flag, False)]
    return KServePlan(
        GenerationSpec(prompt, params, names=KSERVE_FIELDS, unset=unset_fields(fields)),
        stream,
        echo,
        returns,
        empty_final,
        request.requested_outputs,
    )


def _prompt(request: KServeRequest) -> str | ChatPrompt:
    if "messages" in request.inputs:
        messages = _json_input(request, "messages", list)
        if (
            not isinstance(messages, list)
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
            or not messages
        ):
            raise ValidationError("input 'messages' must be a JSON list of {role, content} objects")
        return ChatPrompt(messages)
    if "text_input" not in request.inputs:
        raise ValidationError("input 'text_input' is required")
    raw = _single(request, "text_input")
    if not isinstance(raw, bytes | str):
        raise ValidationError("input 'text_input' must be BYTES (a string)")
    try:
        return raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise ValidationError("input 'text_input' is not UTF-8") from None


def _single(request: KServeRequest, name: str) -> Any:
    values = request.inputs[name]
    if len(values) != 1:
        raise ValidationError(f"input {name!r} must have exactly one element, got {len(values)}")
    return values[0]


def _json_input(request: KServeRequest, name: str, parsed: type) -> Any:
    """A one-element input holding JSON. Triton HTTP's body is JSON already, so a value
    there may come ``parsed``; over gRPC it is BYTES."""
    raw = _single(request, name)
    try:
        return raw if isinstance(raw, parsed) else json_loads(raw)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise ValidationError(f"input {name!r} is not JSON: {exc}") from None


def _flag(request: KServeRequest, name: str, default: bool) -> bool:
    if name not in request.inputs:
        return default
    value = _single(request, name)
    if not isinstance(value, bool):
        raise ValidationError(f"input {name!r} must be BOOL")
    return value


def _sampling_fields(request: KServeRequest) -> SamplingFields:
    if "sampling_parameters" in request.inputs:
        data = _json_input(request, "sampling_parameters", dict)
        if not isinstance(data, dict):
            raise ValidationError("input 'sampling_parameters' must be a JSON object")
    else:
        data = {
            key: value
            for key, value in request.parameters.items()
            if key not in _RESERVED and not key.startswith("triton_")
        }
    if isinstance(data.get("stop"), str) and data["stop"].startswith("["):
        try:  # a JSON list sent as a string parameter
            data["stop"] = json_loads(data["stop"])
        except ValueError as exc:
            raise ValidationError(f"parameter 'stop' is not a JSON list: {exc}") from None
    try:
        return _Sampling.model_validate(data)
    except pydantic.ValidationError as exc:
        problem = first_problem(exc, "sampling_parameters")
        raise ValidationError(f"sampling parameter {problem}") from None
