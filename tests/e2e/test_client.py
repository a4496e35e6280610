"""rillet.client against a real ``rillet serve`` with the bundled model.

Every method, sync and async: stream joined equals non-stream (greedy), details and prefill
tokens when asked, typed errors for 422, and the client working with torch blocked from
import. The 429 (and retry), 401 and in-band error cases run on a fake engine the test holds:
``tests/server/http/test_http_doors.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

import rillet.errors
from rillet.client import (
    AsyncClient,
    Client,
    FinishReason,
    ValidationError,
)
from server_process import ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def test_generate_stream_joined_equals_generate(client: Client) -> None:
    whole = client.generate(PROMPT, max_new_tokens=12)
    items = list(client.generate_stream(PROMPT, max_new_tokens=12))
    joined = "".join(item.token.text for item in items if not item.token.special)
    assert joined == whole.generated_text == items[-1].generated_text
    assert whole.details is not None and items[-1].details is not None
    assert [item.token.id for item in items] == [token.id for token in whole.details.tokens]
    assert items[-1].details.finish_reason == whole.details.finish_reason
    assert items[-1].details.generated_tokens == whole.details.generated_tokens == len(items)
    assert all(item.generated_text is None and item.details is None for item in items[:-1])


def test_details_prefill_and_top_tokens_only_when_asked(client: Client) -> None:
    assert client.generate(PROMPT, max_new_tokens=3, details=False).details is None
    default = client.generate(PROMPT, max_new_tokens=3).details
    assert default is not None
    assert default.prefill == [] and default.top_tokens is None
    assert default.finish_reason is FinishReason.Length and len(default.tokens) == 3

    asked = client.generate(PROMPT, max_new_tokens=3, decoder_input_details=True, top_n_tokens=2)
    assert asked.details is not None
    prefill = asked.details.prefill
    assert "".join(token.text for token in prefill).endswith(PROMPT)
    assert prefill[0].logprob is None
    assert all(token.logprob is not None and token.logprob <= 0 for token in prefill[1:])
    assert asked.details.top_tokens is not None and len(asked.details.top_tokens) == 3
    for chosen, alternatives in zip(asked.details.tokens, asked.details.top_tokens, strict=True):
        assert len(alternatives) == 2
        assert alternatives[0].logprob >= alternatives[1].logprob
        assert alternatives[0].id == chosen.id  # greedy picks the most likely token

    streamed = list(client.generate_stream(PROMPT, max_new_tokens=3, top_n_tokens=2))
    assert all(item.top_tokens is not None and len(item.top_tokens) == 2 for item in streamed)


def test_stop_sequences(client: Client) -> None:
    details = client.generate(PROMPT, max_new_tokens=6).details
    assert details is not None
    tokens = details.tokens
    stop = tokens[1].text
    assert stop and stop not in tokens[0].text, "pick another prompt: the stop text repeats"
    stopped = client.generate(PROMPT, max_new_tokens=6, stop_sequences=[stop])
    assert stopped.generated_text == tokens[0].text + tokens[1].text
    assert stopped.details is not None
    assert stopped.details.finish_reason is FinishReason.StopSequence


def test_chat_stream_joined_equals_chat(client: Client) -> None:
    whole = client.chat(CHAT, max_tokens=12, temperature=0)
    chunks = list(
        client.chat(
            CHAT, stream=True, max_tokens=12, temperature=0, stream_options={"include_usage": True}
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and text == whole.choices[0].message.content
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({chunk.id for chunk in chunks}) == 1


def test_validation_errors_are_typed(client: Client) -> None:
    with pytest.raises(ValidationError) as info:
        client.generate(PROMPT, max_new_tokens=0)
    assert info.value.status_code == 422 and "max_new_tokens" in info.value.message
    assert isinstance(info.value, rillet.errors.ValidationError)
    with pytest.raises(ValidationError):
        next(client.generate_stream(PROMPT, max_new_tokens=0))
    with pytest.raises(ValidationError) as info:
        client.chat(CHAT, max_tokens=0)
    assert info.value.status_code == 400  # OpenAI routes answer bad input with 400
    with pytest.raises(ValidationError):
        next(client.chat(CHAT, stream=True, max_tokens=0))


async def test_async_twin_gives_identical_results(server: ServerHandle) -> None:
    with Client(server.url) as sync:
        expected = sync.generate(PROMPT, max_new_tokens=8, decoder_input_details=True)
        expected_items = list(sync.generate_stream(PROMPT, max_new_tokens=8))
        expected_chat = sync.chat(CHAT, max_tokens=8, temperature=0).choices[0].message.content
    async with AsyncClient(server.url) as client:
        assert await client.generate(PROMPT, max_new_tokens=8, decoder_input_details=True) == (
            expected
        )
        items = [item async for item in client.generate_stream(PROMPT, max_new_tokens=8)]
        assert items == expected_items
        whole = await client.chat(CHAT, max_tokens=8, temperature=0)
        assert whole.choices[0].message.content == expected_chat
        streamed = [
            chunk.choices[0].delta.content or ""
            async for chunk in client.chat(CHAT, stream=True, max_tokens=8, temperature=0)
            if chunk.choices
        ]
        assert "".join(streamed) == expected_chat
        with pytest.raises(ValidationError):
            await client.generate(PROMPT, max_new_tokens=0)
        with pytest.raises(ValidationError):
            async for _ in client.generate_stream(PROMPT, max_new_tokens=0):
                pass


# Run in a fresh interpreter where any attempt to import torch fails.
NO_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
"""


def test_client_works_with_torch_blocked(server: ServerHandle) -> None:
    script = NO_TORCH + (
        "from rillet.client import Client\n"
        "client = Client(sys.argv[1])\n"
        "text = client.generate('Hello', max_new_tokens=4).generated_text\n"
        "chat = list(client.chat([{'role': 'user', 'content': 'Hi'}], stream=True, max_tokens=4))\n"
        "assert text and chat\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'torch' or 'engine' in m]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, server.url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_generate_command_works_with_torch_blocked(server: ServerHandle) -> None:
    script = NO_TORCH + "import runpy\nrunpy.run_module('rillet', run_name='__main__')\n"
    argv = ["generate", PROMPT, "--url", server.url, "--max-new-tokens", "6"]
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    with Client(server.url) as client:
        assert done.stdout == client.generate(PROMPT, max_new_tokens=6).generated_text + "\n"
