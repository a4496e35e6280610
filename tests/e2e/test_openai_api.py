"""The OpenAI routes on a real ``rillet serve``, driven by the real ``openai`` SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server_process import ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

QUESTION = [{"role": "user", "content": "What is 2+2? Answer with one number."}]


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_stream_equals_non_stream_with_usage(client: openai.OpenAI) -> None:
    kwargs = {"model": "any-name", "messages": QUESTION, "max_tokens": 32, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    assert text and "<|im_end|>" not in text

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=QUESTION, max_completion_tokens=3, stream=True, temperature=0
        )
    )
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_stream_non_stream_and_logprobs(client: openai.OpenAI) -> None:
    kwargs = {"model": "m", "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**kwargs, logprobs=2)  # type: ignore[call-overload]
    assert whole.id.startswith("cmpl-") and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == 8 and "".join(logprobs.tokens) == whole.choices[0].text
    assert logprobs.top_logprobs is not None and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    chunks = list(client.completions.create(**kwargs, stream=True))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == entry.top_logprobs[0].logprob
        assert entry.bytes == list(entry.token.encode())


def test_stop_as_string_or_list_is_excluded_from_the_text(client: openai.OpenAI) -> None:
    base = (
        client.completions.create(
            model="m", prompt="Hello, my name is", max_tokens=10, temperature=0
        )
        .choices[0]
        .text
    )
    word = base.split()[2]
    for stop in (word, [word, "zzz-never"]):
        answer = client.completions.create(
            model="m", prompt="Hello, my name is", max_tokens=10, temperature=0, stop=stop
        )
        assert answer.choices[0].finish_reason == "stop"
        assert base.startswith(answer.choices[0].text) and word not in answer.choices[0].text


def test_content_parts_and_vllm_extras(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    answer = client.chat.completions.create(
        model="m",
        messages=parts,  # type: ignore[arg-type]
        max_completion_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "min_tokens": 12, "top_k": -1, "repetition_penalty": 1.0},
    )
    # ignore_eos: the 7-token answer does not stop at <|im_end|>.
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    assert answer.choices[0].finish_reason == "length"


def test_raw_stream_ends_with_done_and_closes(server: ServerHandle) -> None:
    body = {"model": "m", "messages": QUESTION, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        raw = response.read()
    assert response.headers["content-type"] == "text/event-stream"
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    for block in raw.split(b"\n\n")[:-2]:
        chunk = json.loads(block.removeprefix(b"data: "))
        assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk


def test_errors_are_openai_shaped(client: openai.OpenAI, server: ServerHandle) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=QUESTION, n=2)
    assert info.value.status_code == 400 and "`n`" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="x", max_tokens=100_000)
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": "hi"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "validation"
    models = client.models.list()
    assert [m.id for m in models.data] == [httpx.get(server.url + "/info").json()["model_id"]]
