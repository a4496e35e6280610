#!/usr/bin/env python3
"""Soak: one ``rillet serve`` under 64 concurrent mixed streams with disturbances, for N minutes.

Loopback only. 64 workers each loop over scenarios on every door (TGI SSE, OpenAI SSE, the
``/ws`` WebSocket, gRPC ``ModelStreamInfer``):

- ``full``: stream a reply to its end (these are the healthy streams whose tok/s counts);
- ``disconnect``: go away after a random number of events;
- ``cancel``: cancel mid-stream the door's own way (a ``cancel`` frame on /ws; cancelling the
  RPC on gRPC; closing the response on HTTP);
- ``slow``: stop reading for 2-5 s mid-stream, then read to the end;
- ``bad``: a request that must be refused with a 4xx (or an error frame / gRPC status);
- ``resume`` (HTTP doors): a resumable stream (``X-Rillet-Resumable``) dropped after a random
  number of events, then picked up with ``GET /streams/<sid>`` and ``Last-Event-ID``: the
  event ids must run on without a gap or a repeat, to the stream's proper end;
- ``abandon`` (HTTP doors): a resumable stream dropped and never resumed, which the server
  must abort once its resume window (5 s here) passes.

It reports crashes (the server or its engine process gone, engine restarts), 5xx answers
and in-band ``internal`` errors, hung streams (no byte for 60 s), the running gauge and KV
cache usage once idle (both must be 0), the server's RSS (HTTP process + engine) at start
and end, and the tokens/s of the healthy streams.

    .venv/bin/python bench/soak.py --minutes 30           # bench/RESULTS-soak.md
    .venv/bin/python bench/soak.py --minutes 1 --workers 16

Run with the project venv (it uses httpx, websockets and rillet's gRPC client).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import ROOT, children, start_server
from websockets.asyncio.client import connect

from rillet.client import AsyncStreamingClient
from rillet.client.errors import ClientError

HUNG_S = 60.0
DOORS = ("tgi", "openai", "ws", "grpc")
SCENARIOS = {
    "full": 0.40,
    "disconnect": 0.10,
    "cancel": 0.10,
    "slow": 0.15,
    "bad": 0.10,
    "resume": 0.10,
    "abandon": 0.05,
}
#: Scenarios only the HTTP doors have (resumable streams).
HTTP_ONLY = ("resume", "abandon")
RESUME_WINDOW_S = 5
PROMPTS = [
    "Tell me a story about a lighthouse.",
    "What is the capital of France?",
    "Count: one, two,",
    "Write a haiku about the sea.",
    "Explain streaming in one sentence.",
]


class Hung(Exception):
    """No byte for HUNG_S seconds."""


@dataclass
class Tally:
    runs: collections.Counter[str] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx, in-band internal
    unexpected: list[str] = field(default_factory=list)  # wrong answers to bad requests etc.
    hung: list[str] = field(default_factory=list)
    healthy_tokens: int = 0
    healthy_seconds: float = 0.0
    per_stream_tok_s: list[float] = field(default_factory=list)


async def within(awaitable: Any, what: str) -> Any:
    try:
        return await asyncio.wait_for(awaitable, HUNG_S)
    except TimeoutError:
        raise Hung(what) from None


class Soak:
    def __init__(self, url: str, grpc_target: str, model: str, rng: random.Random) -> None:
        self.url, self.grpc_target, self.model, self.rng = url, grpc_target, model, rng
        self.tally = Tally()

    # ---- one scenario on one door -------------------------------------------------------

    async def run_one(self, http: httpx.AsyncClient, grpc: AsyncStreamingClient) -> None:
        door = self.rng.choice(DOORS)
        scenario = self.rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()))[0]
        if scenario in HTTP_ONLY:
            door = self.rng.choice(("tgi", "openai"))
        key = f"{door}/{scenario}"
        self.tally.runs[key] += 1
        max_tokens = self.rng.randint(16, 128)
        prompt = self.rng.choice(PROMPTS)
        try:
            if door == "ws":
                await self.ws(scenario, prompt, max_tokens)
            elif door == "grpc":
                await self.grpc(grpc, scenario, prompt, max_tokens)
            else:
                await self.http(http, door, scenario, prompt, max_tokens)
        except Hung as exc:
            self.tally.hung.append(f"{key}: {exc}")
        except (httpx.HTTPError, OSError) as exc:
            self.tally.unexpected.append(f"{key}: {type(exc).__name__}: {exc}")
        except Exception as exc:  # the harness's own mistake: count it, keep the load on
            self.tally.unexpected.append(f"{key}: harness: {type(exc).__name__}: {exc}")

    def _healthy(self, tokens: int, seconds: float) -> None:
        self.tally.healthy_tokens += tokens
        self.tally.healthy_seconds += seconds
        if seconds > 0:
            self.tally.per_stream_tok_s.append(tokens / seconds)

    def _stop_after(self) -> int:
        return self.rng.randint(1, 12)

    async def http(
        self, http: httpx.AsyncClient, door: str, scenario: str, prompt: str, max_tokens: int
    ) -> None:
        if door == "tgi":
            route = "/generate_stream"
            body: dict[str, Any] = {
                "inputs": prompt,
                "parameters": {"max_new_tokens": max_tokens, "do_sample": True},
            }
            if scenario == "bad":
                body["parameters"] = {"max_new_tokens": -3}
        else:
            route = "/v1/chat/completions"
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "stream": True,
            }
            if scenario == "bad":
                body["messages"] = "not a list"
        started = time.monotonic()
        resumable = scenario in HTTP_ONLY
        headers = {"x-rillet-resumable": "1"} if resumable else {}
        async with http.stream("POST", route, json=body, headers=headers) as response:
            if response.status_code >= 500:
                self.tally.server_errors.append(f"{door}: HTTP {response.status_code}")
                return
            if scenario == "bad":
                if response.status_code not in (400, 422):
                    self.tally.unexpected.append(f"{door}/bad: HTTP {response.status_code}")
                await within(response.aread(), f"{door} bad body")
                return
            if response.status_code != 200:
                self.tally.unexpected.append(f"{door}: HTTP {response.status_code}")
                await within(response.aread(), f"{door} refusal body")
                return
            stop_after = self._stop_after()
            read = await self._events(response, door, scenario, stop_after)
            sid = response.headers.get("x-rillet-stream-id")
        if read is None:
            return
        events, last_id, ended = read
        if scenario == "full":
            self._healthy(events, time.monotonic() - started)
        if scenario != "resume" or ended:
            return
        # Dropped (leaving the block closed the connection); pick the stream up again.
        if sid is None:
            self.tally.unexpected.append(f"{door}/resume: no x-rillet-stream-id")
            return
        resumed = {"last-event-id": str(last_id)}
        async with http.stream("GET", f"/streams/{sid}", headers=resumed) as response:
            if response.status_code != 200:
                self.tally.unexpected.append(f"{door}/resume: HTTP {response.status_code}")
                await within(response.aread(), f"{door} resume refusal")
                return
            rest = await self._events(response, door, "full", 0, first_id=last_id + 1)
        if rest is not None and not rest[2]:
            self.tally.unexpected.append(f"{door}/resume: the resumed stream did not end")

    async def _events(
        self,
        response: httpx.Response,
        door: str,
        scenario: str,
        stop_after: int,
        first_id: int = 1,
    ) -> tuple[int, int, bool] | None:
        """Read an SSE body as ``scenario`` says: the events read, the last event id, and
        whether the stream reached its end; None after an in-band error (tallied). Event ids,
        when there are any, must run on from ``first_id`` without a gap or a repeat."""
        lines = response.aiter_lines()
        events, next_id, last_id = 0, first_id, first_id - 1
        while True:
            try:
                line = await within(anext(lines), f"{door} next line")
            except StopAsyncIteration:
                return events, last_id, False
            if line.startswith("id:"):
                number = int(line[3:].strip())
                if number != next_id:
                    self.tally.unexpected.append(f"{door}: event id {number}, expected {next_id}")
                next_id, last_id = number + 1, number
                continue
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return events, last_id, True
            event = json.loads(payload)
            if "error" in event:  # an in-band error event (a token's text may say "error")
                error = event["error"]
                kind = event.get("error_type") or error.get("type")
                self.tally.server_errors.append(f"{door}: in-band {kind}: {error}")
                return None
            events += 1
            if door == "tgi" and event.get("generated_text") is not None:
                return events, last_id, True
            if scenario in ("disconnect", "cancel", *HTTP_ONLY) and events >= stop_after:
                return events, last_id, False  # the caller's leaving closes the connection
            if scenario == "slow" and events == stop_after:
                await asyncio.sleep(self.rng.uniform(2, 5))

    async def ws(self, scenario: str, prompt: str, max_tokens: int) -> None:
        async with connect(self.url.replace("http", "ws") + "/ws") as sock:
            frame: dict[str, Any] = {
                "type": "generate",
                "id": 1,
                "prompt": prompt,
                "max_tokens": max_tokens,
            }
            if scenario == "bad":
                await sock.send("{not json")
                answer = json.loads(await within(sock.recv(), "ws bad frame"))
                if answer.get("type") != "error" or answer.get("error_type") != "validation":
                    self.tally.unexpected.append(f"ws/bad: {answer}")
                return
            started = time.monotonic()
            await sock.send(json.dumps(frame))
            tokens, stop_after = 0, self._stop_after()
            while True:
                message = json.loads(await within(sock.recv(), "ws next frame"))
                if message["type"] == "token":
                    tokens += len(message.get("token_ids") or [1])
                    if scenario == "disconnect" and tokens >= stop_after:
                        return  # closing the socket aborts the generation
                    if scenario == "cancel" and tokens >= stop_after:
                        await sock.send(json.dumps({"type": "cancel", "id": 1}))
                        scenario = "cancelled"
                    if scenario == "slow" and tokens == stop_after:
                        await asyncio.sleep(self.rng.uniform(2, 5))
                elif message["type"] == "error":
                    self.tally.server_errors.append(f"ws: {message}")
                    return
                else:  # done
                    if scenario == "full":
                        done_tokens = message["usage"]["completion_tokens"]
                        self._healthy(done_tokens, time.monotonic() - started)
                    return

    async def grpc(
        self, client: AsyncStreamingClient, scenario: str, prompt: str, max_tokens: int
    ) -> None:
        if scenario == "bad":
            try:
                await within(client.generate(prompt, max_tokens="lots"), "grpc bad request")
            except ClientError as exc:
                if exc.error_type != "validation":
                    self.tally.unexpected.append(f"grpc/bad: {exc!r}")
            else:
                self.tally.unexpected.append("grpc/bad: accepted")
            return
        started = time.monotonic()
        pieces, stop_after = 0, self._stop_after()
        stream = client.stream(prompt, max_tokens=max_tokens)
        try:
            while True:
                try:
                    await within(anext(stream), "grpc next response")
                except StopAsyncIteration:
                    break
                pieces += 1
                if scenario in ("disconnect", "cancel") and pieces >= stop_after:
                    return  # closing the iterator cancels the RPC
                if scenario == "slow" and pieces == stop_after:
                    await asyncio.sleep(self.rng.uniform(2, 5))
        except ClientError as exc:
            internal = exc.error_type == "internal"
            where = self.tally.server_errors if internal else self.tally.unexpected
            where.append(f"grpc: {exc!r}")
            return
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if scenario == "full":
            self._healthy(pieces, time.monotonic() - started)

    # ---- the whole run ------------------------------------------------------------------

    async def run(self, workers: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=workers * 2, max_keepalive_connections=workers)
        async with (
            httpx.AsyncClient(base_url=self.url, timeout=None, limits=limits) as http,
            AsyncStreamingClient(self.model, url=self.grpc_target) as grpc,
        ):

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self.run_one(http, grpc)

            await asyncio.gather(*(worker() for _ in range(workers)))


# ---- the server's side ------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(FileNotFoundError):  # a process that ended meanwhile
            todo += children(current)
    return tree


def rss_mib(pid: int) -> float:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{member}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return total / 1024


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    wanted = (
        "rillet_requests_running",
        "rillet_requests_waiting",
        "rillet_requests_in_flight",
        "rillet_kv_cache_usage_ratio",
        "rillet_engine_restarts",
        "rillet_resumable_streams",
    )
    found = {}
    for name in wanted:
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def report(args: argparse.Namespace, soak: Soak, facts: dict[str, Any]) -> str:
    t = soak.tally
    total = sum(t.runs.values())
    tok_s = sorted(t.per_stream_tok_s)
    median = tok_s[len(tok_s) // 2] if tok_s else 0.0
    lines = [
        f"{args.minutes} minutes, {args.workers} concurrent workers, seed {args.seed}: "
        f"{total} requests ({', '.join(f'{k} {v}' for k, v in sorted(t.runs.items()))}).",
        "",
        "| check | result |",
        "|---|---|",
        f"| server process alive at the end | {facts['alive']} |",
        f"| engine restarts (engine deaths) | {facts['idle']['rillet_engine_restarts']:.0f} |",
        f"| 5xx answers and in-band internal errors | {len(t.server_errors)} |",
        f"| hung streams (no byte for {HUNG_S:.0f} s) | {len(t.hung)} |",
        f"| other unexpected answers | {len(t.unexpected)} |",
        f"| running / waiting / in flight once idle | "
        f"{facts['idle']['rillet_requests_running']:.0f} / "
        f"{facts['idle']['rillet_requests_waiting']:.0f} / "
        f"{facts['idle']['rillet_requests_in_flight']:.0f} |",
        f"| resumable streams held once idle | {facts['idle']['rillet_resumable_streams']:.0f} |",
        f"| KV cache usage once idle | {facts['idle']['rillet_kv_cache_usage_ratio']:.4f} |",
        f"| RSS at start / end (MiB, server + engine) | {facts['rss_start']:.0f} / "
        f"{facts['rss_end']:.0f} ({100 * (facts['rss_end'] / facts['rss_start'] - 1):+.1f} %) |",
        f"| healthy streams: tokens/s per stream, median | {median:.1f} |",
        f"| healthy streams: tokens/s, all together | "
        f"{t.healthy_tokens / (args.minutes * 60):.1f} |",
    ]
    for title, items in (
        ("5xx / internal", t.server_errors),
        ("hung", t.hung),
        ("unexpected", t.unexpected),
    ):
        if items:
            lines += ["", f"{title} (first 10):", *(f"- {item}" for item in items[:10])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="2")
    args = parser.parse_args()
    out = ROOT / "bench" / "out" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    # A 1 GiB cache: the warm-up below cycles through all of it, so the RSS baseline has the
    # whole cache resident (its pages are taken as they are first written).
    options = ["--resume-window", str(RESUME_WINDOW_S), "--kv-cache-memory", "1"]
    proc, url, grpc_target, model = start_server(out, args.threads, options)
    try:
        # A minute of the same load first, not measured: the kernels are warm, the KV cache
        # and the allocator's pools are filled, so the RSS baseline is a serving one.
        asyncio.run(Soak(url, grpc_target, model, random.Random(-1)).run(args.workers, 60))
        rss_start = rss_mib(proc.pid)
        soak = Soak(url, grpc_target, model, random.Random(args.seed))
        asyncio.run(soak.run(args.workers, args.minutes * 60))
        # The last aborts land within a step; abandoned streams once their window passes.
        time.sleep(RESUME_WINDOW_S + 2)
        facts = {
            "alive": proc.poll() is None,
            "idle": scrape(url),
            "rss_start": rss_start,
            "rss_end": rss_mib(proc.pid),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = report(args, soak, facts)
    print(text)
    (out / "report.md").write_text(text + "\n")
    print(f"\nlog and report: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
