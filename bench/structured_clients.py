#!/usr/bin/env python3
"""Structured outputs and tool calls through the stock ``openai`` SDK, on a served model:
the checks issue 28 asks for on Qwen2.5 1.5B, each printed with what came back.

Starts ``rillet serve --model MODEL`` itself (this interpreter, so the same ``PYTHONPATH``)
unless ``--url`` names a running server, then, greedy:

1. ``chat.completions.parse(response_format=<pydantic model>)`` returns a parsed object;
2. a ``json_object`` stream arrives in many chunks and the text parses as an object;
3. streamed tool calls with ``tool_choice`` naming the tool, and ``"required"``, assemble
   into arguments that validate against the tool's schema (``jsonschema``);
4. a tool result round trip (the assistant's ``tool_calls``, then a ``role: "tool"``
   message) gets an answer in ``content`` with ``tool_choice: "none"`` (what ``"auto"``
   returns is printed too);
5. ``tool_choice: "auto"`` with a question that needs the tool gives a well-formed call.

    .venv/bin/python bench/structured_clients.py                  # qwen2.5-coder-1.5b
    .venv/bin/python bench/structured_clients.py --model smollm2-135m
    .venv/bin/python bench/structured_clients.py --url http://127.0.0.1:8080

Exit code 1 when a check fails (each failure is printed as FAIL with its reason).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import openai
from harness import free_port, wait_ready
from pydantic import BaseModel

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


class City(BaseModel):
    """What check 1 asks the model to fill in."""

    name: str
    country: str
    population: int
    landmarks: list[str]


class Checks:
    """Runs the checks against one server and remembers which failed."""

    def __init__(self, client: openai.OpenAI, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.failed: list[str] = []

    def run(self, name: str, check: Callable[[], str]) -> None:
        """Run one check: print its summary, or FAIL and the reason."""
        start = time.perf_counter()
        try:
            summary = check()
        except Exception as exc:  # a check's failure is reported, not raised
            self.failed.append(name)
            print(f"FAIL {name} ({time.perf_counter() - start:.1f} s): {type(exc).__name__}: {exc}")
            return
        print(f"ok   {name} ({time.perf_counter() - start:.1f} s): {summary}")

    def _fields(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens, **fields}

    def parse_pydantic(self) -> str:
        messages: Any = [
            {"role": "user", "content": "Describe Paris as JSON: name, country, population."}
        ]
        done = self.client.chat.completions.parse(
            **self._fields(messages=messages, response_format=City)
        )
        parsed = done.choices[0].message.parsed
        if not isinstance(parsed, City):
            raise AssertionError(
                f"parsed is {parsed!r}, content {done.choices[0].message.content!r}"
            )
        return f"{type(parsed).__name__} {parsed.model_dump()}"

    def json_object_stream(self) -> str:
        messages: Any = [
            {
                "role": "user",
                "content": "Give a JSON object describing Tokyo with keys name, country and "
                "population. Answer with JSON only.",
            }
        ]
        text, chunks, finish = "", 0, None
        stream = self.client.chat.completions.create(
            **self._fields(messages=messages, response_format={"type": "json_object"}),
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        value = json.loads(text)
        if not isinstance(value, dict) or chunks < 5:
            raise AssertionError(f"{chunks} chunks, {text!r}")
        return f"{chunks} content chunks, finish {finish}, {value}"

    def _streamed_calls(self, messages: Any, tool_choice: Any) -> tuple[list[Any], str, int]:
        """The calls a stream assembles (index order), its finish reason and fragment count."""
        calls: dict[int, dict[str, Any]] = {}
        finish, fragments = "", 0
        stream = self.client.chat.completions.create(
            **self._fields(messages=messages, tools=TOOLS, tool_choice=tool_choice), stream=True
        )
        for chunk in stream:
            if not chunk.choices:
                continue
            for piece in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    call["id"] = piece.id
                if piece.function and piece.function.name:
                    call["name"] = piece.function.name
                if piece.function and piece.function.arguments:
                    call["arguments"] += piece.function.arguments
                    fragments += 1
            finish = chunk.choices[0].finish_reason or finish
        return [calls[i] for i in sorted(calls)], finish, fragments

    def _validated(self, calls: list[Any], finish: str, names: set[str]) -> str:
        """Each call is a listed tool whose arguments validate; a summary of them."""
        if not calls or finish != "tool_calls":
            raise AssertionError(f"finish {finish!r}, calls {calls}")
        for call in calls:
            if call["name"] not in names or not call["id"]:
                raise AssertionError(f"call {call}")
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        return ", ".join(f"{c['name']}({c['arguments']})" for c in calls)

    def named_tool_stream(self) -> str:
        choice = {"type": "function", "function": {"name": "get_weather"}}
        calls, finish, fragments = self._streamed_calls(ASK_WEATHER, choice)
        summary = self._validated(calls, finish, {"get_weather"})
        return f"{summary}, {fragments} argument fragments, finish {finish}"

    def required_tool_stream(self) -> str:
        messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
        calls, finish, fragments = self._streamed_calls(messages, "required")
        summary = self._validated(calls, finish, set(SCHEMAS))
        return f"{summary}, {fragments} argument fragments, finish {finish}"

    def tool_result_round_trip(self) -> str:
        choice = {"type": "function", "function": {"name": "get_weather"}}
        first = self.client.chat.completions.create(
            **self._fields(messages=ASK_WEATHER, tools=TOOLS, tool_choice=choice)
        )
        call = (first.choices[0].message.tool_calls or [None])[0]
        if call is None or call.type != "function":
            raise AssertionError(f"no call: {first.choices[0].message}")
        messages: Any = [
            *ASK_WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": json.dumps({"temperature_c": 18, "sky": "light rain"}),
            },
        ]
        # With the tools still offered ("auto"), Qwen2.5-Coder-1.5B repeats the call (greedy,
        # and so does its unconstrained output); "none" keeps them out of the prompt, and
        # asks for the answer, as a client that wants the final text does.
        auto = self.client.chat.completions.create(**self._fields(messages=messages, tools=TOOLS))
        answer = self.client.chat.completions.create(
            **self._fields(messages=messages, tools=TOOLS, tool_choice="none")
        )
        message = answer.choices[0].message
        if not message.content or message.tool_calls:
            raise AssertionError(f"answer {message}")
        again = auto.choices[0].message
        auto_said = (
            f"calls {[(c.function.name, c.function.arguments) for c in again.tool_calls]}"
            if again.tool_calls
            else repr(again.content)
        )
        return (
            f"call {call.function.name}({call.function.arguments}) -> tool_choice none: "
            f"{message.content!r}; auto: {auto.choices[0].finish_reason}, {auto_said}"
        )

    def auto_tool(self) -> str:
        done = self.client.chat.completions.create(
            **self._fields(messages=ASK_WEATHER, tools=TOOLS, tool_choice="auto")
        )
        choice = done.choices[0]
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
            if c.type == "function"
        ]
        summary = self._validated(calls, choice.finish_reason, set(SCHEMAS))
        streamed, finish, fragments = self._streamed_calls(ASK_WEATHER, "auto")
        streamed_summary = self._validated(streamed, finish, set(SCHEMAS))
        if streamed_summary != summary:
            raise AssertionError(f"streamed {streamed_summary} against {summary}")
        return f"{summary}; streamed the same in {fragments} argument fragments"


@contextmanager
def served(model: str, log: Path) -> Iterator[str]:
    """``rillet serve --model MODEL`` on a free port, until the block ends; its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "rillet", "serve", "--model", model, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        wait_ready(url, proc, timeout=600)
        print(f"rillet serve --model {model}: ready in {time.perf_counter() - start:.1f} s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="served by this script")
    parser.add_argument("--url", help="a running server instead (its model is used)")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        if args.url:
            return check_all(args.url, args.max_tokens)
        try:
            with served(args.model, log) as url:
                return check_all(url, args.max_tokens)
        except RuntimeError as exc:
            print(f"rillet serve failed: {exc}\n{log.read_text()[-4000:]}")
            return 1


def check_all(url: str, max_tokens: int) -> int:
    """Every check against the server at ``url``; 1 when any failed."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    model = client.models.list().data[0].id
    print(f"model {model} at {url}, openai {openai.__version__}, greedy")
    checks = Checks(client, model, max_tokens)
    checks.run("parse(response_format=pydantic model)", checks.parse_pydantic)
    checks.run("json_object stream", checks.json_object_stream)
    checks.run("streamed tool call, tool_choice named", checks.named_tool_stream)
    checks.run('streamed tool call, tool_choice "required"', checks.required_tool_stream)
    checks.run("tool result round trip", checks.tool_result_round_trip)
    checks.run('tool_choice "auto", a question that needs the tool', checks.auto_tool)
    print(f"{6 - len(checks.failed)} of 6 checks passed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
