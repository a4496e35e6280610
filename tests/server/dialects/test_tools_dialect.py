"""OpenAI tools without a server: tool_choice -> constraint, refusals, and the chunks and
answers a generation's tool calls become."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fake_engine import char_tokenizer
from rillet.constraint import Constraint, ConstraintKind
from rillet.engine.grammar import check_constraint
from rillet.errors import ValidationError
from rillet.protocol import FinishReason, GeneratedToken, RequestOutput
from rillet.server.dialects import openai
from rillet.server.dialects.openai_render import OpenAIRenderer
from rillet.server.spec import ChatPrompt

MESSAGES = [{"role": "user", "content": "Weather?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(**fields: Any) -> openai.OpenAIPlan:
    body = {"messages": MESSAGES, "tools": [WEATHER, NOW], **fields}
    return openai.plan_chat(openai.ChatCompletionRequest.model_validate(body))


def tag_format(plan: openai.OpenAIPlan) -> dict[str, Any]:
    constraint = plan.spec.params.constraint
    assert constraint is not None and constraint.kind is ConstraintKind.STRUCTURAL_TAG
    check_constraint(constraint)  # xgrammar takes it
    return json.loads(constraint.value)["format"]  # type: ignore[no-any-return]


def test_tool_choices_become_structural_tags() -> None:
    auto = tag_format(chat())
    assert auto["type"] == "triggered_tags" and auto["triggers"] == ["<tool_call>"]
    assert [t["begin"] for t in auto["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "now", "arguments": ',
    ]
    assert auto["tags"][1]["content"]["json_schema"] == {"type": "object", "properties": {}}
    assert not auto["stop_after_first"]
    required = tag_format(chat(tool_choice="required", parallel_tool_calls=False))
    assert required["type"] == "tags_with_separator" and required["at_least_one"]
    assert required["stop_after_first"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, {"function": {"name": "get_weather"}}, "get_weather"):
        one = tag_format(chat(tool_choice=choice))
        assert one["type"] == "tag" and one["begin"].endswith('"get_weather", "arguments": ')
    prompt = chat().spec.prompt
    assert isinstance(prompt, ChatPrompt) and prompt.tools == [WEATHER, NOW]


def test_tool_choice_none_leaves_output_and_prompt_free() -> None:
    plan = chat(tool_choice="none")
    assert plan.spec.params.constraint is None
    assert isinstance(plan.spec.prompt, ChatPrompt) and plan.spec.prompt.tools is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in `tools`"),
        ({"tool_choice": "any"}, "'any', which is not in `tools`"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "only function tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "function.name"),
        ({"tools": [WEATHER, WEATHER]}, "listed twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "JSON Schema object",
        ),
        ({"response_format": {"type": "json_object"}}, "cannot be combined with `tools`"),
        (
            {"messages": [{"role": "tool", "content": "21"}]},
            r"messages\[0\].tool_call_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
                    }
                ]
            },
            "not valid JSON",
        ),
    ],
)
def test_bad_tools_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        chat(**fields)


def test_a_tool_schema_the_grammar_would_not_enforce_is_refused() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}
    constraint = chat(tools=[bad]).spec.params.constraint
    assert constraint is not None
    with pytest.raises(ValidationError, match="`not`"):
        check_constraint(constraint)


def test_structured_outputs_and_guided_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        ({"structured_outputs": {"json": schema}}, Constraint.json_schema(schema)),
        ({"structured_outputs": {"regex": "[0-9]+"}}, Constraint.regex("[0-9]+")),
        ({"structured_outputs": {"choice": ["a", "b"]}}, Constraint.choice(["a", "b"])),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, Constraint.grammar('root ::= "x"')),
        ({"structured_outputs": {"json_object": True}}, Constraint.json_object()),
        ({"guided_json": schema}, Constraint.json_schema(schema)),
        ({"guided_regex": "[0-9]+"}, Constraint.regex("[0-9]+")),
        ({"guided_choice": ["a", "b"]}, Constraint.choice(["a", "b"])),
        ({"guided_grammar": 'root ::= "x"'}, Constraint.grammar('root ::= "x"')),
    ]
    for fields, wanted in cases:
        body = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})
        assert openai.plan_chat(body).spec.params.constraint == wanted, fields
        completion = openai.CompletionRequest.model_validate({"prompt": "Hi", **fields})
        plan = openai.plan_completion(completion, char_tokenizer())
        assert plan.spec.params.constraint == wanted, fields


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"structured_outputs": {"json": {}, "regex": "x"}}, "exactly one of"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_json": "{", "structured_outputs": None}, "guided_json"),
        ({"guided_regex": "x", "response_format": {"type": "json_object"}}, "only one"),
    ],
)
def test_bad_structured_outputs_are_refused(fields: dict[str, Any], message: str) -> None:
    body = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})
    with pytest.raises(ValidationError, match=message):
        openai.plan_chat(body)


def outputs(text: str, per_output: int, finish: FinishReason) -> list[RequestOutput]:
    pieces = [text[i : i + per_output] for i in range(0, len(text), per_output)]
    return [
        RequestOutput(
            "r1",
            [GeneratedToken(3, piece, -0.5, False)],
            piece,
            finish if i == len(pieces) - 1 else None,
            5,
            i + 1,
        )
        for i, piece in enumerate(pieces)
    ]


@pytest.mark.parametrize("per_output", [1, 3, 1000])
def test_streamed_call_chunks_are_openais(per_output: int) -> None:
    renderer = OpenAIRenderer(char_tokenizer(), "m", chat(stream=True), "r1")
    text = "Sure." + CALL + "\n" + CALL.replace("Paris", "Rome")
    chunks = [
        c for out in outputs(text, per_output, FinishReason.EOS_TOKEN) for c in renderer.chunks(out)
    ]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "Sure."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    starts = [t for t in calls if "id" in t]
    assert [s["index"] for s in starts] == [0, 1]
    for start in starts:
        assert start["id"].startswith("call_") and len(start["id"]) == 29
        assert start["type"] == "function" and start["function"] == {
            "name": "get_weather",
            "arguments": "",
        }
    for later in (t for t in calls if "id" not in t):
        assert set(later) == {"index", "function"} and set(later["function"]) == {"arguments"}
    for index, city in enumerate(["Paris", "Rome"]):
        arguments = "".join(t["function"]["arguments"] for t in calls if t["index"] == index)
        assert json.loads(arguments) == {"city": city}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_whole_answer_has_tool_calls_and_null_content() -> None:
    renderer = OpenAIRenderer(char_tokenizer(), "m", chat(), "r1")
    [last] = outputs(CALL, 1000, FinishReason.EOS_TOKEN)
    answer = renderer.answer(last)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_text_answer_with_tools_is_plain_content() -> None:
    renderer = OpenAIRenderer(char_tokenizer(), "m", chat(), "r1")
    [last] = outputs("No call needed.", 1000, FinishReason.EOS_TOKEN)
    choice = renderer.answer(last)["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "No call needed."}
    assert choice["finish_reason"] == "stop"


def test_a_call_cut_by_the_length_limit_finishes_with_length() -> None:
    renderer = OpenAIRenderer(char_tokenizer(), "m", chat(stream=True), "r1")
    chunks = [c for out in outputs(CALL[:40], 7, FinishReason.LENGTH) for c in renderer.chunks(out)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


#: Qwen2.5-Coder-1.5B's greedy call under tool_choice "auto" (measured): a Markdown block.
FENCED_CALL = (
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'
)


@pytest.mark.parametrize("per_output", [1, 4, 1000])
def test_a_fenced_call_naming_a_listed_tool_streams_as_a_call(per_output: int) -> None:
    renderer = OpenAIRenderer(char_tokenizer(), "m", chat(stream=True), "r1")
    chunks = [
        c
        for out in outputs(FENCED_CALL, per_output, FinishReason.EOS_TOKEN)
        for c in renderer.chunks(out)
    ]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(t["function"]["arguments"] for t in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    if per_output == 1:
        assert len(calls) > 10  # the arguments went out as they were generated
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_fenced_call_of_an_unlisted_name_stays_content() -> None:
    renderer = OpenAIRenderer(char_tokenizer(), "m", chat(), "r1")
    text = FENCED_CALL.replace("get_weather", "get_news")
    [last] = outputs(text, 1000, FinishReason.EOS_TOKEN)
    choice = renderer.answer(last)["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == "stop"
