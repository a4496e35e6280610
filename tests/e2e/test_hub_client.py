"""``huggingface_hub`` (2.x, what users run today) against a real ``rillet serve``.

The same client at <1.0 (pinned by ``text-generation``) runs in ``.venv-tgi``:
see ``test_server_text_generation.py``.
"""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import ValidationError

from server_process import ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = "Hello, my name is"
QUESTION = [{"role": "user", "content": "What is 2+2? Answer with one number."}]


def test_hub_is_2x() -> None:
    assert int(huggingface_hub.__version__.split(".")[0]) >= 1


def test_text_generation_stream_with_details(server: ServerHandle) -> None:
    client = InferenceClient(server.url, timeout=60)
    outputs = list(
        client.text_generation(
            PROMPT, max_new_tokens=8, stream=True, details=True, return_full_text=False
        )
    )
    assert [o.index for o in outputs] == list(range(1, 9))
    assert outputs[-1].details is not None and outputs[-1].details.finish_reason == "length"
    assert outputs[-1].details.generated_tokens == 8
    text = "".join(o.token.text for o in outputs)
    assert outputs[-1].generated_text == text
    whole = client.text_generation(PROMPT, max_new_tokens=8, details=True, return_full_text=False)
    assert whole.generated_text == text
    assert whole.details is not None and len(whole.details.tokens) == 8
    # Tokens only (details=False) are the stream's token texts, one per event.
    assert list(client.text_generation(PROMPT, max_new_tokens=8, stream=True)) == [
        o.token.text for o in outputs
    ]


def test_chat_completion_stream(server: ServerHandle) -> None:
    client = InferenceClient(base_url=server.url, timeout=60)
    whole = client.chat.completions.create(messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(messages=QUESTION, max_tokens=16, temperature=0, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_validation_error_is_typed(server: ServerHandle) -> None:
    client = InferenceClient(server.url, timeout=60)
    with pytest.raises(ValidationError, match="stop sequences"):
        client.text_generation(PROMPT, max_new_tokens=2, stop=["a", "b", "c", "d", "e"])


async def test_async_client_streams(server: ServerHandle) -> None:
    client = AsyncInferenceClient(server.url, timeout=60)
    outputs = [
        o
        async for o in await client.text_generation(
            PROMPT, max_new_tokens=6, stream=True, details=True
        )
    ]
    assert len(outputs) == 6 and outputs[-1].details is not None
    assert outputs[-1].details.finish_reason == "length"
    chunks = [
        c
        async for c in await client.chat.completions.create(
            messages=QUESTION, max_tokens=16, temperature=0, stream=True
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
