"""The plain-text dialect (``POST /?prompt=``): the chat template unless ``raw=true``."""

from __future__ import annotations

import pytest

from rillet.errors import ValidationError
from rillet.server.dialects import plain
from rillet.server.spec import ChatPrompt


def test_the_prompt_is_the_users_turn_when_the_model_has_a_chat_template() -> None:
    spec = plain.plan("Tell me a story.", {}, has_chat_template=True).spec
    assert isinstance(spec.prompt, ChatPrompt)
    assert spec.prompt.messages == [{"role": "user", "content": "Tell me a story."}]
    assert spec.params.is_greedy and spec.params.max_new_tokens == plain.DEFAULT_MAX_NEW_TOKENS


@pytest.mark.parametrize(("query", "template"), [({"raw": "true"}, True), ({}, False)])
def test_raw_or_a_model_without_a_template_gets_the_prompt_as_is(
    query: dict[str, str], template: bool
) -> None:
    spec = plain.plan("Once upon", {**query, "max_new_tokens": "5"}, has_chat_template=template)
    assert spec.spec.prompt == "Once upon" and spec.spec.params.max_new_tokens == 5


@pytest.mark.parametrize("query", [{"max_new_tokens": "-1"}, {"raw": "maybe"}])
def test_bad_query_parameters_are_validation_errors(query: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        plain.plan("x", query, has_chat_template=True)
