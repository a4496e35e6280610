"""The KServe dialect: vLLM-backend inputs to a spec, and the outputs of each response."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from json_strategies import json_values
from rillet.constraint import Constraint
from rillet.errors import NotFoundError, RilletError, ValidationError
from rillet.protocol import FinishReason, GeneratedToken, RequestOutput
from rillet.server import kserve
from rillet.server.spec import ChatPrompt


def request(**inputs: object) -> kserve.KServeRequest:
    return kserve.KServeRequest(
        id="1", model_name="m", inputs={k: [v] for k, v in inputs.items()}, parameters={}
    )


def test_sampling_parameters_are_vllm_names_and_strings_are_cast() -> None:
    sampling = json.dumps({"temperature": "0.1", "top_p": "0.95", "max_tokens": "100"})
    plan = kserve.plan(request(text_input=b"Hi", sampling_parameters=sampling.encode()))
    params = plan.spec.params
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.1, 0.95, 100)
    assert plan.spec.prompt == "Hi" and not plan.stream and plan.echo == "Hi"
    # Without the tensor, the request's parameters are read the same way (Triton's own
    # parameters left out); vLLM's default of 16 tokens.
    from_parameters = kserve.KServeRequest(
        "2", "m", {"text_input": [b"Hi"]}, {"temperature": 0.0, "triton_x": True, "priority": 1}
    )
    assert kserve.plan(from_parameters).spec.params.is_greedy
    assert kserve.plan(from_parameters).spec.params.max_new_tokens == kserve.DEFAULT_MAX_TOKENS


def test_the_per_request_draft_cap_is_read_as_the_other_sampling_fields() -> None:
    """llama-server's ``speculative.n_max`` among the OpenAI names, cast from a string as
    they are, in the tensor or the request's parameters."""
    tensor = request(text_input=b"Hi", sampling_parameters=b'{"speculative.n_max": "2"}')
    assert kserve.plan(tensor).spec.params.num_speculative_tokens == 2
    parameters = kserve.KServeRequest("2", "m", {"text_input": [b"Hi"]}, {"speculative.n_max": 0})
    assert kserve.plan(parameters).spec.params.num_speculative_tokens == 0
    assert kserve.plan(request(text_input=b"Hi")).spec.params.num_speculative_tokens is None
    with pytest.raises(ValidationError, match=r"speculative\.n_max"):
        kserve.plan(request(text_input=b"Hi", sampling_parameters=b'{"speculative.n_max": -1}'))


def test_streaming_excludes_the_prompt_and_refuses_to_include_it() -> None:
    assert kserve.plan(request(text_input=b"Hi", stream=True)).echo == ""
    with pytest.raises(ValidationError, match="exclude_input_in_output"):
        kserve.plan(request(text_input=b"Hi", stream=True, exclude_input_in_output=False))
    with pytest.raises(ValidationError, match="streaming endpoint"):
        kserve.plan(request(text_input=b"Hi", stream=True), one_response=True)


def test_messages_are_a_chat_and_bad_inputs_are_named() -> None:
    chat = kserve.plan(request(messages=json.dumps([{"role": "user", "content": "Hi"}]).encode()))
    assert isinstance(chat.spec.prompt, ChatPrompt) and chat.echo == ""
    for bad, message in (
        (request(stream=True), "'text_input' is required"),
        (request(text_input=5), "must be BYTES"),
        (request(text_input=b"Hi", stream=1), "'stream' must be BOOL"),
        (request(text_input=b"Hi", colour=b"red"), "unexpected input"),
        (request(messages=b"[{}]"), "'messages' must be"),
        (request(text_input=b"Hi", sampling_parameters=b"[]"), "JSON object"),
        (request(text_input=b"Hi", sampling_parameters=b'{"top_k": "many"}'), "top_k"),
    ):
        with pytest.raises(ValidationError, match=message):
            kserve.plan(bad)
    with pytest.raises(NotFoundError):
        kserve.check_model("other", "m")
    kserve.check_model("m.streaming", "m")


def test_outputs_follow_the_return_flags_and_the_requested_names() -> None:
    plan = kserve.plan(
        request(
            text_input=b"Hi",
            return_finish_reason=True,
            return_num_input_tokens=True,
            return_num_output_tokens=True,
            return_cumulative_logprob=True,
        )
    )
    renderer = kserve.KServeRenderer(plan)
    first = RequestOutput("r", [GeneratedToken(1, "a", -0.5, False)], "a", None, 3, 1)
    last = RequestOutput(
        "r", [GeneratedToken(2, "b", -0.25, False)], "b", FinishReason.LENGTH, 3, 2
    )
    made = [{o.name: o.values for o in renderer.delta(out)} for out in (first, last)]
    assert made[0] == {
        "text_output": [b"a"],
        "finish_reason": [b"None"],
        "num_input_tokens": [3],
        "num_output_tokens": [1],
        "cumulative_logprob": [-0.5],
    }
    assert made[1]["finish_reason"] == [b"length"] and made[1]["cumulative_logprob"] == [-0.75]
    plan.requested_outputs = ["text_output"]
    assert [o.name for o in kserve.KServeRenderer(plan).delta(last)] == ["text_output"]


def test_a_whole_answer_starts_with_the_prompt_unless_excluded_and_is_final() -> None:
    token = GeneratedToken(1, " there", -0.5, False)
    whole = RequestOutput("r", [token], " there", FinishReason.EOS_TOKEN, 2, 1)
    for inputs, text in (({}, b"Hi there"), ({"exclude_input_in_output": True}, b" there")):
        plan = kserve.plan(request(text_input=b"Hi", return_finish_reason=True, **inputs))
        made = {o.name: o.values for o in kserve.KServeRenderer(plan).answer(whole)}
        assert made == {"text_output": [text], "finish_reason": [b"stop"]}


def test_json_in_tensors_and_parameters_is_guarded() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    for bad, message in (
        (request(text_input=b"Hi", sampling_parameters=deep), "nested deeper than 64"),
        (request(messages=deep), "nested deeper than 64"),
        (kserve.KServeRequest("3", "m", {"text_input": [b"Hi"]}, {"stop": "[oops"}), "'stop'"),
    ):
        with pytest.raises(ValidationError, match=message):
            kserve.plan(bad)


TENSOR_NAMES = [
    "text_input",
    "messages",
    "stream",
    "sampling_parameters",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_num_output_tokens",
    "max_tokens",
]
elements = st.lists(
    json_values
    | st.binary(max_size=8)
    | st.floats()
    | st.builds(lambda v: json.dumps(v).encode(), json_values),
    max_size=3,
)


@given(
    inputs=st.dictionaries(st.sampled_from(TENSOR_NAMES), elements, max_size=5),
    parameters=st.dictionaries(
        st.sampled_from(["temperature", "stop", "max_tokens", "seed"]), json_values
    ),
    one_response=st.booleans(),
)
@settings(max_examples=400)
def test_any_tensors_are_a_plan_or_a_typed_error(
    inputs: dict[str, list[object]], parameters: dict[str, object], one_response: bool
) -> None:
    """Wrong types, shapes and JSON: a plan whose parameters validate, or a RilletError (the
    gRPC door sends it as INVALID_ARGUMENT on the stream, which stays up)."""
    request = kserve.KServeRequest("f", "m", inputs, parameters)
    with contextlib.suppress(RilletError):
        kserve.plan(request, one_response=one_response).spec.params.validate()


def test_constraints_in_sampling_parameters_and_request_parameters() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fields = [
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            }
        },
        {"structured_outputs": {"json": schema}},
        {"guided_json": json.dumps(schema)},
    ]
    for sampling in fields:
        plan = kserve.plan(request(text_input=b"Hi", sampling_parameters=json.dumps(sampling)))
        assert plan.spec.params.constraint == Constraint.json_schema(schema)
    # Triton's request parameters are strings: an object field may be JSON text.
    as_parameters = kserve.KServeRequest(
        "2", "m", {"text_input": [b"Hi"]}, {"structured_outputs": '{"choice": ["a", "b"]}'}
    )
    assert kserve.plan(as_parameters).spec.params.constraint == Constraint.choice(["a", "b"])
    with pytest.raises(ValidationError, match="structured_outputs"):
        kserve.plan(request(text_input=b"Hi", sampling_parameters='{"structured_outputs": 3}'))
