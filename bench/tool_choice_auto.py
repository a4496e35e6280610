#!/usr/bin/env python3
"""Does a served model's ``tool_choice: "auto"`` answer come back as a call? One request per
question, greedy, with the ``openai`` SDK, streamed and not; prints what each returned.

    rillet serve --model qwen2.5-coder-1.5b --port 8080 &
    .venv/bin/python bench/tool_choice_auto.py --url http://127.0.0.1:8080 \\
        "What is the weather like in Paris right now? Use the tool." "Write a haiku."

Exit code 1 when a streamed answer's calls or finish reason differ from the whole answer's.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import openai

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused", timeout=600)
    same = True
    for question in args.questions:
        fields: Any = {
            "model": "m",
            "messages": [{"role": "user", "content": question}],
            "tools": [WEATHER],
            "tool_choice": "auto",
            "temperature": 0,
            "max_tokens": args.max_tokens,
        }
        start = time.perf_counter()
        whole = client.chat.completions.create(**fields)
        message = whole.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        print(f"Q: {question}")
        print(
            f"  whole ({time.perf_counter() - start:.1f} s): {whole.choices[0].finish_reason}, "
            f"content={message.content!r}, calls={calls}"
        )
        streamed: dict[int, list[str]] = {}
        content, finish, fragments = "", None, 0
        for chunk in client.chat.completions.create(**fields, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                entry = streamed.setdefault(piece.index, ["", ""])
                if piece.function and piece.function.name:
                    entry[0] = piece.function.name
                if piece.function and piece.function.arguments:
                    entry[1] += piece.function.arguments
                    fragments += 1
            finish = chunk.choices[0].finish_reason or finish
        pairs = [(name, arguments) for name, arguments in streamed.values()]
        print(
            f"  streamed: {finish}, content={content!r}, calls={pairs}, "
            f"{fragments} argument fragments"
        )
        for _, arguments in pairs:
            json.loads(arguments)
        same = same and pairs == calls and finish == whole.choices[0].finish_reason
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
