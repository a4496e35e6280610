"""``rillet bench --dataset``: ShareGPT conversations as requests, filtered as vLLM filters
them, each sent once per run; and the sample the repository ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rillet.benchmark.dataset import Conversations, DatasetError, to_prompt
from rillet.benchmark.workload import Prompt
from rillet.models.loader import load_model_files

SAMPLE = Path(__file__).resolve().parents[2] / "bench" / "data" / "sharegpt-sample.json"


def words(text: str) -> int:
    return len(text.split())


def turn(source: str, value: str) -> dict[str, str]:
    return {"from": source, "value": value}


def test_history_before_the_last_answer_is_the_prompt_and_the_answer_sets_max_tokens() -> None:
    conversation = [
        turn("system", "You answer in full sentences."),
        turn("human", "What is the capital of France?"),
        turn("gpt", "The capital of France is Paris."),
        turn("human", "And of Italy, please?"),
        turn("gpt", "The capital of Italy is Rome, a very old city."),
        turn("human", "a trailing question nobody answered"),
    ]
    prompt = to_prompt(conversation, words)
    assert prompt == Prompt(
        (
            {"role": "system", "content": "You answer in full sentences."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy, please?"},
        ),
        max_tokens=10,
    )
    assert prompt.text().endswith("User: And of Italy, please?\n\nAssistant:")


@pytest.mark.parametrize(
    "conversation",
    [
        [turn("human", "Only a question, no answer at all.")],
        [turn("gpt", "An answer to nothing at all here.")],
        [turn("human", "Hi"), turn("gpt", "Hello there, how are you today?")],  # prompt < 4
        [turn("human", "Tell me something long."), turn("gpt", "No.")],  # answer < 4
        [turn("human", "word " * 1025), turn("gpt", "fine, a short answer")],  # prompt > 1024
        [turn("human", "word " * 1000), turn("gpt", "word " * 1049)],  # total > 2048
        [turn("robot", "Beep boop beep boop."), turn("gpt", "That is not a human turn.")],
    ],
)
def test_conversations_vllm_would_skip_are_skipped(conversation: list[dict[str, str]]) -> None:
    assert to_prompt(conversation, words) is None


def test_each_call_takes_the_next_conversation_in_a_seeded_order(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    entries = [
        {
            "id": str(i),
            "conversations": [
                turn("human", f"question number {i} here"),
                turn("gpt", f"answer {i} " + "word " * i),
            ],
        }
        for i in range(4, 10)
    ]
    path.write_text(json.dumps([*entries, {"id": "x"}, "not an object"]))
    first = Conversations(path, words, seed=1)
    assert len(first) == 6
    drawn = [first(0) for _ in range(12)]  # the index is ignored: numbered by call
    assert drawn[:6] == drawn[6:] and len({p.max_tokens for p in drawn[:6]}) == 6
    assert [Conversations(path, words, seed=1)(0) for _ in range(1)] == drawn[:1]
    assert [p.max_tokens for p in drawn[:6]] != [
        p.max_tokens for p in Conversations(path, words, seed=2).prompts
    ]


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', "[]", '[{"conversations": []}]'])
def test_a_file_with_nothing_to_send_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match="--dataset"):
        Conversations(path, words)


def test_the_shipped_sample_is_mostly_usable_by_the_bundled_tokenizer() -> None:
    tokenizer = load_model_files(None).tokenizer
    entries = json.loads(SAMPLE.read_text())
    sample = Conversations(
        SAMPLE, lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    )
    assert len(entries) >= 200 and len(sample) >= 0.9 * len(entries)
    kinds = {
        "multi-turn": sum(1 for p in sample.prompts if len(p.messages) >= 3),
        "system": sum(1 for p in sample.prompts if p.messages[0]["role"] == "system"),
        "long": sum(1 for p in sample.prompts if words(p.messages[-1]["content"]) > 200),
    }
    assert all(count >= 0.05 * len(sample) for count in kinds.values()), kinds
