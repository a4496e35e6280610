"""``stream_options.continuous_usage_stats`` on the OpenAI routes, as vLLM sends it: the
cumulative ``usage`` on every chunk, after ``choices``; without it, chunks stay as they were."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app_server import door

pytestmark = pytest.mark.timeout(30)


async def _chunks(d: Any, route: str, body: dict[str, Any]) -> list[Any]:
    response = await d.http.post(route, json=body)
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


async def test_chat_chunks_carry_usage_so_far_then_the_usage_chunk() -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"continuous_usage_stats": True},
    }
    async with door() as d:
        chunks = await _chunks(d, "/v1/chat/completions", body)
    prompt = chunks[0]["usage"]["prompt_tokens"]
    assert prompt > 0
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
    assert all(
        c["usage"]["total_tokens"] == prompt + c["usage"]["completion_tokens"] for c in chunks
    )
    assert all(list(c)[-2:] == ["choices", "usage"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["H", "e", "l"]
    assert chunks[-1]["choices"] == []  # include_usage's chunk, as before


async def test_completion_chunks_carry_usage_and_none_without_the_option() -> None:
    body: dict[str, Any] = {"prompt": "Hi", "max_tokens": 2, "stream": True}
    async with door() as d:
        continuous = await _chunks(
            d, "/v1/completions", body | {"stream_options": {"continuous_usage_stats": True}}
        )
        plain = await _chunks(d, "/v1/completions", body | {"stream_options": {}})
        no_usage_at_all = await _chunks(
            d,
            "/v1/completions",
            body | {"stream_options": {"include_usage": False, "continuous_usage_stats": True}},
        )
    assert [c["usage"] for c in continuous] == [
        {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    ]
    assert ["usage" in c for c in plain] == [False, False, True]
    assert ["usage" in c for c in no_usage_at_all] == [False, False]  # vLLM: needs include_usage
