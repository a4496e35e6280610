#!/usr/bin/env python3
"""How long a running stream stalls when a server's first constrained request arrives.

A 60-token chat stream runs; after its 8th token, a ``json_schema`` request is sent. Prints
the stream's median gap before that, its longest gap from then until shortly after the
constrained request's first token, and that request's time to first token. Run it on a
freshly started server (its first constrained request), e.g.:

    rillet serve --model qwen2.5-coder-1.5b --port 8080 & sleep 30
    .venv/bin/python bench/first_constrained.py --url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any

import httpx

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}


async def stream(client: httpx.AsyncClient, url: str, body: Any, stamps: list[float]) -> None:
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())


async def main(url: str) -> None:
    base = {"model": "m", "temperature": 0, "stream": True}
    story = [{"role": "user", "content": "Tell me a long story about rivers."}]
    ask = [{"role": "user", "content": "Paris as JSON"}]
    constrained = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    async with httpx.AsyncClient(timeout=600) as client:
        running: list[float] = []
        first: list[float] = []
        task = asyncio.create_task(
            stream(client, url, {**base, "max_tokens": 60, "messages": story}, running)
        )
        while len(running) < 8:
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        body = {**base, "max_tokens": 20, "messages": ask, "response_format": constrained}
        await asyncio.gather(task, stream(client, url, body, first))
    pairs = list(itertools.pairwise(running))
    before = sorted(b - a for a, b in pairs if b < sent)
    during = [b - a for a, b in pairs if b >= sent and a <= first[0] + 0.5]
    print(
        f"median gap before: {before[len(before) // 2] * 1000:.0f} ms; longest gap while "
        f"the constrained request starts: {max(during) * 1000:.0f} ms; its first token "
        f"after {(first[0] - sent) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    asyncio.run(main(parser.parse_args().url))
