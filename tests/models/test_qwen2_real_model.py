"""The real Qwen2.5-Coder-0.5B-Instruct from the catalogue (``scripts/setup.sh --test`` pulls
it), served by its catalogue name: greedy answers that are known to be right, through the
OpenAI chat route and its own client, streamed and not.

Outside CI a machine without the model skips these tests, saying how to install it; in CI
(``CI=true``) a missing model fails them, so the qwen2 path is never silently untested.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest

from rillet.models.catalogue import CATALOGUE, missing_parts
from rillet.models.model_cache import cached_path
from server_process import ServerHandle, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "qwen2.5-coder-0.5b"


def require_model() -> None:
    """Skip (fail in CI) unless the model's packages or its joined file are installed."""
    entry = CATALOGUE[MODEL]
    if cached_path(entry).is_file() or not missing_parts(entry):
        return
    why = f"{MODEL} is not installed: `rillet pull {MODEL}` (or scripts/setup.sh --test)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI must run the real-model tests")
    pytest.skip(why)


@pytest.fixture(scope="module")
def qwen_server() -> Iterator[ServerHandle]:
    require_model()
    handle = start_server(["--model", MODEL], threads=2)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(qwen_server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen_server.url}/v1", api_key="unused", timeout=300)


def ask(client: openai.OpenAI, question: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0.0,
        max_tokens=max_tokens,
    )
    content = reply.choices[0].message.content
    assert content is not None
    return content


def test_served_by_its_catalogue_name(client: openai.OpenAI) -> None:
    # `--model NAME` serves the catalogue's checked file, under that file's name.
    served = CATALOGUE[MODEL].file_name.removesuffix(".gguf")
    assert [m.id for m in client.models.list().data] == [served]


def test_a_known_fact(client: openai.OpenAI) -> None:
    answer = ask(client, "What is the capital of France? Answer with one word.", 8)
    assert answer.strip().rstrip(".") == "Paris"


def test_arithmetic(client: openai.OpenAI) -> None:
    answer = ask(client, "What is 12 times 12? Answer with the number only.", 8)
    assert answer.strip().rstrip(".") == "144"


def test_a_working_function_streamed_as_it_is_answered(client: openai.OpenAI) -> None:
    question = (
        "Write a Python function fibonacci(n) that returns the n-th Fibonacci number, "
        "with fibonacci(0) == 0 and fibonacci(1) == 1. Reply with only the code."
    )
    whole = ask(client, question, 160)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0.0,
        max_tokens=160,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 10  # token by token, not one lump
    assert "".join(pieces) == whole  # greedy: the stream is the same answer
    code = whole.split("```python\n", 1)[-1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "answer", "exec"), namespace)  # the model's own code, run
    fibonacci = namespace["fibonacci"]
    assert callable(fibonacci)
    assert [fibonacci(n) for n in range(10)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
