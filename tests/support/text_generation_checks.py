"""Checks run with ``.venv-tgi/bin/python`` (``text-generation`` 0.7.0 pins huggingface_hub<1).

Usage: ``text_generation_checks.py URL FULL_URL``: ``URL`` is a default ``rillet serve``,
``FULL_URL`` a rillet server whose only slot (``--max-concurrent-requests 1``) is taken.
Driven by ``test_server_text_generation.py``; prints one line per check and exits 1 if any
failed. Not collected by pytest on its own (the main venv lacks ``text_generation``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import traceback
from collections.abc import Callable

import huggingface_hub
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError
from text_generation.types import Grammar, GrammarType

EOS_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT = "Hello, my name is"
URL, FULL_URL = sys.argv[1:3] if len(sys.argv) == 3 else ("", "")


def check_generate_and_stream_agree() -> None:
    client = Client(URL, timeout=60)
    whole = client.generate(PROMPT, max_new_tokens=8)
    assert whole.details.finish_reason.value == "length" and whole.details.generated_tokens == 8
    assert whole.details.seed is None
    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert len(events) == 8 and all(e.details is None for e in events[:-1])
    last = events[-1]
    assert last.details is not None and last.details.finish_reason.value == "length"
    assert last.generated_text == whole.generated_text == "".join(e.token.text for e in events)
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]


def check_eos_is_special() -> None:
    events = list(Client(URL, timeout=60).generate_stream(EOS_PROMPT, max_new_tokens=32))
    assert events[-1].token.special and events[-1].details is not None
    assert events[-1].details.finish_reason.value == "eos_token"


def check_stop_sequences() -> None:
    client = Client(URL, timeout=60)
    whole = client.generate(EOS_PROMPT, max_new_tokens=32, stop_sequences=["is "])
    assert whole.details.finish_reason.value == "stop_sequence"
    assert whole.generated_text.endswith("is ")
    events = list(client.generate_stream(EOS_PROMPT, max_new_tokens=32, stop_sequences=["is "]))
    assert events[-1].generated_text == whole.generated_text


def check_top_n_tokens() -> None:
    client = Client(URL, timeout=60)
    whole = client.generate(PROMPT, max_new_tokens=4, top_n_tokens=2)
    assert whole.details.top_tokens is not None and len(whole.details.top_tokens) == 4
    events = list(client.generate_stream(PROMPT, max_new_tokens=4, top_n_tokens=2))
    assert all(e.top_tokens is not None and len(e.top_tokens) == 2 for e in events)


def check_sampling_with_seed() -> None:
    client = Client(URL, timeout=60)
    first = client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, top_p=0.9)
    again = client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, top_p=0.9)
    assert first.generated_text == again.generated_text and first.details.seed == 3


def check_validation_error() -> None:
    client = Client(URL, timeout=60)
    for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
        try:
            call(PROMPT, max_new_tokens=2, stop_sequences=["a", "b", "c", "d", "e"])
        except ValidationError as exc:
            assert "stop sequences" in str(exc)
        else:
            raise AssertionError("no ValidationError")


def check_overloaded_error() -> None:
    client = Client(FULL_URL, timeout=60)
    for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
        try:
            call(PROMPT, max_new_tokens=2)
        except OverloadedError:
            pass
        else:
            raise AssertionError("no OverloadedError")


def check_async_client() -> None:
    async def run() -> None:
        client = AsyncClient(URL, timeout=60)
        whole = await client.generate(PROMPT, max_new_tokens=6)
        events = [e async for e in client.generate_stream(PROMPT, max_new_tokens=6)]
        assert events[-1].generated_text == whole.generated_text

    asyncio.run(run())


def check_hub_0x_inference_client() -> None:
    assert huggingface_hub.__version__.startswith("0."), huggingface_hub.__version__
    client = huggingface_hub.InferenceClient(URL, timeout=60)
    outputs = list(client.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True))
    assert len(outputs) == 6 and outputs[-1].details.finish_reason == "length"
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    chunks = list(client.chat_completion(messages, max_tokens=16, temperature=0, stream=True))
    whole = client.chat_completion(messages, max_tokens=16, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def check_grammar_json() -> None:
    client = Client(URL, timeout=60)
    grammar = Grammar(type=GrammarType.Json, value=SCHEMA)
    prompt = "A person as JSON:"
    whole = client.generate(prompt, max_new_tokens=40, grammar=grammar)
    value = json.loads(whole.generated_text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int), value
    assert whole.details.finish_reason.value == "eos_token"
    events = list(client.generate_stream(prompt, max_new_tokens=40, grammar=grammar))
    assert len(events) > 3 and events[-1].generated_text == whole.generated_text


def check_grammar_regex() -> None:
    client = Client(URL, timeout=60)
    grammar = Grammar(type=GrammarType.Regex, value=r"[0-9]{3}-[0-9]{4}")
    whole = client.generate("My phone number is", max_new_tokens=20, grammar=grammar)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", whole.generated_text), whole.generated_text
    events = list(client.generate_stream("My phone number is", max_new_tokens=20, grammar=grammar))
    assert events[-1].generated_text == whole.generated_text


def check_bad_grammar_is_a_validation_error() -> None:
    client = Client(URL, timeout=60)
    bad = [
        Grammar(type=GrammarType.Regex, value="(unclosed"),
        Grammar(type=GrammarType.Json, value={"type": "object", "properties": 3}),
    ]
    for grammar in bad:
        for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
            try:
                call(PROMPT, max_new_tokens=4, grammar=grammar)
            except ValidationError:
                pass
            else:
                raise AssertionError(f"no ValidationError for {grammar}")


CHECKS: list[Callable[[], None]] = [
    check_generate_and_stream_agree,
    check_eos_is_special,
    check_stop_sequences,
    check_top_n_tokens,
    check_sampling_with_seed,
    check_validation_error,
    check_overloaded_error,
    check_async_client,
    check_hub_0x_inference_client,
    check_grammar_json,
    check_grammar_regex,
    check_bad_grammar_is_a_validation_error,
]


def main() -> int:
    failed = 0
    for check in CHECKS:
        try:
            check()
            print(f"ok   {check.__name__}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {check.__name__}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
