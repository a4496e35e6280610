"""``rillet bench``'s long-prompt workloads: exact lengths by the bundled tokenizer, a
different start for every request, one shared prefix when asked."""

from __future__ import annotations

import pytest

from rillet.benchmark.long_prompts import PromptSet
from rillet.models.loader import load_model_files


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_model_files(None).tokenizer


def test_every_prompt_has_exactly_n_tokens_and_its_own_first_block(tokenizer) -> None:  # type: ignore[no-untyped-def]
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prompts = PromptSet(encode, tokenizer.decode, input_tokens=1024)
    texts = [prompts(i) for i in range(20)]
    assert [len(encode(t)) for t in texts] == [1024] * 20
    first_blocks = {tuple(encode(t)[:16]) for t in texts}
    assert len(first_blocks) == 20  # a prefix cache finds nothing to share
    assert prompts(3) not in texts  # a new level's request 3 gets a new document
    assert prompts.document(3) == texts[3]  # and a run repeats the same documents


def test_a_shared_prefix_is_exact_and_the_same_for_every_request(tokenizer) -> None:  # type: ignore[no-untyped-def]
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prompts = PromptSet(encode, tokenizer.decode, shared_prefix_tokens=512)
    assert prompts.shared is not None and len(encode(prompts.shared)) == 512
    first, second = prompts(0), prompts(1)
    assert first.startswith(prompts.shared) and second.startswith(prompts.shared)
    assert first != second
    with pytest.raises(ValueError):
        PromptSet(encode, tokenizer.decode)
