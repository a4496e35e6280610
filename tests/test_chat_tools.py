"""Tools in chat prompts: a template with tool support (Qwen2.5's) renders as transformers
renders it; a template without gets the Hermes-style fallback."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from rillet.chat_template import CHATML_TEMPLATE, ChatTemplate

QWEN25 = (Path(__file__).parent / "support" / "qwen25_chat_template.jinja").read_text()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
]


def test_a_template_with_tools_renders_as_transformers_does() -> None:
    ours = ChatTemplate(QWEN25).render(ROUND_TRIP, True, {"tools": TOOLS})
    # transformers is handed the arguments as an object, as vLLM hands them over.
    theirs_messages = json.loads(json.dumps(ROUND_TRIP))
    theirs_messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    theirs, _ = render_jinja_template(
        [theirs_messages], tools=TOOLS, chat_template=QWEN25, add_generation_prompt=True
    )
    assert ours == theirs[0]
    assert '"arguments": {"city": "Paris"}}' in ours  # an object, not a string in a string
    assert '<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>' in ours
    assert ChatTemplate(QWEN25).reads_tools and not ChatTemplate(CHATML_TEMPLATE).reads_tools


def test_a_template_without_tools_gets_the_fallback() -> None:
    text = ChatTemplate(CHATML_TEMPLATE).render(ROUND_TRIP, True, {"tools": TOOLS})
    system, user, assistant, results, prompt = text.split("<|im_start|>")[1:]
    assert system.startswith("system\n# Tools\n") and json.dumps(TOOLS[0]) in system
    assert '<tool_call>\n{"name": <function-name>' in system
    assert user == "user\nWeather in Paris?<|im_end|>\n"
    assert assistant == (
        'assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
    )
    assert results == (
        'user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        "<tool_response>\nsunny\n</tool_response><|im_end|>\n"
    )
    assert prompt == "assistant\n"


def test_the_fallback_extends_the_clients_system_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = ChatTemplate(CHATML_TEMPLATE).render(messages, True, {"tools": TOOLS})
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1


def test_no_tools_renders_as_before() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert ChatTemplate(CHATML_TEMPLATE).render(messages, True, {}) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
