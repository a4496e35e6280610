"""OpenAI's dialect without a server: bodies, the mapping (with vLLM's extras), and the
chunks, answers and errors vLLM sends."""

from __future__ import annotations

import pytest

from fake_engine import char_tokenizer
from rillet.constraint import Constraint
from rillet.errors import OverloadedError, ValidationError
from rillet.protocol import FinishReason, GeneratedToken, RequestOutput
from rillet.server.dialects import openai
from rillet.server.dialects.openai_render import OpenAIRenderer, error_body, status
from rillet.server.spec import ChatPrompt

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**fields: object) -> openai.OpenAIPlan:
    return openai.plan_chat(
        openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})
    )


def completion(**fields: object) -> openai.OpenAIPlan:
    body = openai.CompletionRequest.model_validate({"prompt": "Hi", **fields})
    return openai.plan_completion(body, char_tokenizer())


def test_bodies_are_lenient() -> None:
    body = openai.ChatCompletionRequest.model_validate(
        {
            "model": "https://example.com/any",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "logprobs": None,
            "stream_options": {},
            "ignore_eos": True,
        }
    )
    assert body.stream_options is not None and body.stream_options.include_usage is True
    planned = openai.plan_chat(body)
    assert isinstance(planned.spec.prompt, ChatPrompt)
    assert planned.spec.prompt.messages == [{"role": "user", "content": "hi"}]
    assert planned.include_usage and planned.spec.params.ignore_eos


def test_response_format_constrains_chat_and_completions() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    wanted = {"name": "thing", "schema": schema, "strict": True}
    for plan in (
        chat(response_format={"type": "json_schema", "json_schema": wanted}),
        completion(response_format={"type": "json_schema", "json_schema": wanted}),
    ):
        assert plan.spec.params.constraint == Constraint.json_schema(schema)
    assert chat(response_format={"type": "json_object"}).spec.params.constraint == (
        Constraint.json_object()
    )
    no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert chat(response_format=no_schema).spec.params.constraint == Constraint.json_object()
    assert chat(response_format={"type": "text"}).spec.params.constraint is None
    assert chat().spec.params.constraint is None


def test_defaults_and_vllm_extras() -> None:
    params = chat().spec.params
    assert params.temperature == 1.0 and params.max_new_tokens is None
    assert completion().spec.params.max_new_tokens == 16
    extras = chat(top_k=-1, min_p=0.1, stop="x", max_completion_tokens=3, max_tokens=9).spec
    assert extras.params.top_k == 0 and extras.params.min_p == 0.1
    assert extras.params.stop == ["x"] and not extras.params.include_stop_str_in_output
    assert extras.params.max_new_tokens == 3  # max_completion_tokens wins
    assert extras.names.prompt == "messages" and extras.names.max_new_tokens == "max_tokens"
    assert completion(prompt=[[5, 6]]).spec.prompt == [5, 6]
    assert completion(echo=True, prompt=[46, 21]).echo == "Hi"


def test_llama_servers_per_request_draft_cap() -> None:
    """``speculative.n_max`` as llama-server reads it: this request's draft tokens per step."""
    assert chat().spec.params.num_speculative_tokens is None
    assert chat(**{"speculative.n_max": 2}).spec.params.num_speculative_tokens == 2
    assert completion(**{"speculative.n_max": 0}).spec.params.num_speculative_tokens == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 2}, "`n`"),
        ({"logit_bias": {"1": 2}}, "`logit_bias`"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{"}}}, "JSON"),
        ({"top_logprobs": 2}, "`logprobs` must be true"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ],
)
def test_what_is_refused_rather_than_ignored(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        chat(**fields)
    with pytest.raises(ValidationError, match="one prompt"):
        completion(prompt=["a", "b"])


def test_chunks_answer_and_usage() -> None:
    planned = chat(logprobs=True, stream=True, stream_options={"include_usage": True})
    renderer = OpenAIRenderer(char_tokenizer(), "m", planned, "r1")
    first = RequestOutput("r1", [GeneratedToken(46, "H", -0.5, False)], "H", None, 3, 1)
    last = RequestOutput(
        "r1", [GeneratedToken(2, "", -0.1, True)], "", FinishReason.EOS_TOKEN, 3, 2
    )
    chunks = renderer.chunks(first) + renderer.chunks(last)
    assert [c["id"] for c in chunks] == ["chatcmpl-r1"] * 3
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "H"}
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["token"] == "H"
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    usage = renderer.usage_chunk(last)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    first.merge(last)
    answer = renderer.answer(first)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "H"}


def test_errors_are_openai_shaped_with_400_for_validation() -> None:
    assert status(ValidationError("x")) == 400 and status(OverloadedError()) == 429
    assert error_body(ValidationError("bad")) == {
        "error": {"message": "bad", "type": "validation", "param": None, "code": 400}
    }
