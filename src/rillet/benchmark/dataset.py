"""Conversations from a ShareGPT-format file, as ``vllm bench serve --dataset-name sharegpt``
reads them, one request each.

A file is a JSON list of ``{"id": ..., "conversations": [{"from": "human" | "gpt" |
"system", "value": text}, ...]}``. Each conversation becomes one request: every turn before
its last ``gpt`` turn is the prompt (so a multi-turn conversation sends its history), and
that answer's length in tokens is the request's ``max_tokens``, so every server writes as
much as the conversation really got. As in vLLM, conversations whose prompt or answer is
under 4 tokens, whose prompt is over 1,024 or whose prompt and answer pass 2,048 are left
out.

Requests are numbered by call, not by index, like the long-prompt documents: a level
takes the next conversations of the file, so a run of several levels sends each
conversation once until the file runs out, and no level finds the previous level's
prompts in a prefix cache. ``bench/data/sharegpt-sample.json`` is a sample made for rillet
(``bench/make_sharegpt_sample.py``), since the real ShareGPT cannot be downloaded here.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rillet.benchmark.workload import Prompt

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES["system"] = "system"

#: vLLM's ShareGPT filter: shorter prompts or answers are noise, longer ones exceed the
#: context of the models it was written for.
MIN_TOKENS, MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS = 4, 1024, 2048


class DatasetError(ValueError):
    """The file is not ShareGPT JSON, or none of its conversations can be sent."""


def to_prompt(turns: Sequence[dict[str, Any]], count: Callable[[str], int]) -> Prompt | None:
    """The request a conversation makes (None when it has no answer to measure against)."""
    messages = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", "")).lower())
        value = turn.get("value")
        if role is None or not isinstance(value, str):
            return None
        messages.append({"role": role, "content": value})
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_answer < 1:
        return None
    history, answer = messages[:last_answer], messages[last_answer]["content"]
    prompt_tokens = sum(count(m["content"]) for m in history)
    output_tokens = count(answer)
    if prompt_tokens < MIN_TOKENS or output_tokens < MIN_TOKENS:
        return None
    if prompt_tokens > MAX_PROMPT_TOKENS or prompt_tokens + output_tokens > MAX_TOTAL_TOKENS:
        return None
    return Prompt(tuple(history), max_tokens=output_tokens)


class Conversations:
    """``prompt(i)`` for a run: the file's usable conversations in a seeded shuffled order."""

    def __init__(self, path: Path, count: Callable[[str], int], seed: int = 0) -> None:
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"--dataset {path}: {exc}") from exc
        if not isinstance(entries, list):
            raise DatasetError(f"--dataset {path}: a ShareGPT file is a JSON list")
        self.prompts = [
            prompt
            for entry in entries
            if isinstance(entry, dict)
            and isinstance(entry.get("conversations"), list)
            and (prompt := to_prompt(entry["conversations"], count)) is not None
        ]
        if not self.prompts:
            raise DatasetError(f"--dataset {path}: no conversation with a usable answer")
        random.Random(seed).shuffle(self.prompts)
        self._calls = itertools.count()

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, index: int) -> Prompt:
        return self.prompts[next(self._calls) % len(self.prompts)]
