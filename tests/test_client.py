"""rillet.client against a real ``rillet serve`` with the bundled model.

Every method, sync and async: stream joined equals non-stream (greedy), details and prefill
tokens when asked, typed errors for 422 and 429 (and retry on 429), an in-band error event
mid-stream, and the client working with torch blocked from import.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

import rillet.errors
from rillet.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    FinishReason,
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    Response,
    ValidationError,
)
from server_process import LIMITED_API_KEY, LIMITED_AUTH, ServerHandle, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_for_metric(url: str, name: str, predicate: str, value: float) -> None:
    """Poll /metrics until ``name <predicate> value`` holds (no timing assertion: a deadline)."""
    deadline = time.monotonic() + 30
    while True:
        current = _metric(url, name)
        if (current == value) if predicate == "==" else (current > value):
            return
        assert time.monotonic() < deadline, f"{name} stuck at {current}"
        time.sleep(0.05)


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


def test_overloaded_is_429_and_retry_waits_for_a_slot(limited_server: ServerHandle) -> None:
    url = limited_server.url
    # The slot holder must outlast what follows however fast the engine is: no EOS
    # (ignore_eos, an OpenAI-route extension), thousands of tokens; closing it aborts it.
    holder_body = {"prompt": PROMPT, "max_tokens": 6000, "ignore_eos": True, "stream": True}
    with (
        Client(url, LIMITED_API_KEY) as client,
        httpx.stream(
            "POST", f"{url}/v1/completions", json=holder_body, headers=LIMITED_AUTH, timeout=60
        ) as holder,
    ):
        assert holder.status_code == 200
        holder_lines = holder.iter_lines()  # kept: a collected iterator closes the response
        next(holder_lines)  # the server's only slot is now taken
        with pytest.raises(OverloadedError) as info:
            client.generate(PROMPT, max_new_tokens=2)
        assert info.value.status_code == 429 and info.value.retry_after is not None
        with pytest.raises(OverloadedError):
            next(client.generate_stream(PROMPT, max_new_tokens=2))
        with pytest.raises(OverloadedError):
            client.chat(CHAT, max_tokens=2)

        # A client with retries keeps asking, honouring retry-after, until the slot frees.
        refused = 'rillet_requests_total{outcome="overloaded",route="generate"}'
        before = _metric(url, refused)
        results: list[Response | BaseException] = []

        def retrying() -> None:
            with Client(url, LIMITED_API_KEY, max_retries=30) as patient:
                try:
                    results.append(patient.generate(PROMPT, max_new_tokens=2))
                except BaseException as exc:
                    results.append(exc)

        thread = threading.Thread(target=retrying)
        thread.start()
        _wait_for_metric(url, refused, ">", before)  # its first attempt was refused...
        holder.close()  # ...then the slot frees (closing the stream aborts the request)
        thread.join(60)
        assert len(results) == 1 and isinstance(results[0], Response), results
        assert results[0].details is not None and results[0].details.generated_tokens == 2


def test_wrong_api_key_is_an_authentication_error(limited_server: ServerHandle) -> None:
    with pytest.raises(AuthenticationError) as info:
        Client(limited_server.url, "wrong").generate(PROMPT, max_new_tokens=2)
    assert info.value.status_code == 401


def test_in_band_error_mid_stream_raises() -> None:
    """Stop a server while it streams: the streams in flight end with an in-band error event."""
    handle = start_server(["--shutdown-grace", "0"])
    try:
        client = Client(handle.url)
        # Both must still be generating at SIGTERM however fast the engine is: greedy
        # counting runs on for hundreds of tokens, and the chat ignores EOS (a vLLM
        # extension); a short or sampled reply can end first and leave nothing to fail.
        tgi = client.generate_stream("Count: one, two,", max_new_tokens=4000)
        chat = client.chat(
            CHAT, stream=True, max_tokens=4000, temperature=0, extra_body={"ignore_eos": True}
        )
        assert next(tgi).token.text is not None
        assert next(chat).choices
        handle.proc.send_signal(signal.SIGTERM)
        for stream in (tgi, chat):
            with pytest.raises((GenerationError, IncompleteGenerationError)) as info:
                for _ in stream:
                    pass
            assert info.value.status_code is None  # it came in-band, after HTTP 200
    finally:
        handle.stop()


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
