"""The load loops: closed (a level per concurrency) and open (a level per request rate).

Closed: at concurrency C, C workers keep one request each in flight. They draw request
indices from one shared counter, so a level sends exactly ``requests_for(C)`` requests
(fewer only if its time cap strikes) and a slow request never stalls the others.

Open: at rate R, requests start at Poisson arrival times (exponential gaps of mean 1/R,
seeded, so two runs send at the same offsets) whether or not earlier ones have finished,
as users do; ``concurrency`` caps those in flight, and a request due while the cap is full
waits for a slot (its TTFT counts from when it is sent, as in ``vllm bench serve``).

Levels run one after another on one HTTP client whose connection pool is at least as
large as the most requests in flight, so no request waits for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from rillet.benchmark import spec_metrics
from rillet.benchmark.progress import Progress
from rillet.benchmark.stats import summarize_level
from rillet.benchmark.stream import RequestRecord, stream_request
from rillet.benchmark.sysstat import CpuSnapshot
from rillet.benchmark.workload import BenchConfig

#: Bumped when a field of the JSON lines changes meaning.
FORMAT_VERSION = 1

#: Called with each level's row as soon as the level ends, and with its records.
RowSink = Callable[[dict[str, Any], list[RequestRecord]], None]
#: Sends request ``record.index`` and fills its record (SSE over HTTP, or gRPC).
Send = Callable[[RequestRecord], Awaitable[RequestRecord]]


class WarmupFailed(Exception):
    """The server did not answer the warm-up request: the run would measure only errors."""


def make_client(config: BenchConfig) -> httpx.AsyncClient:
    """An HTTP client sized for the run's highest concurrency."""
    connections = max(config.concurrency) + 4
    limits = httpx.Limits(
        max_connections=connections,
        # Without keep-alive every request opens a fresh connection, as some harnesses do;
        # it also sidesteps servers that close a connection after each stream.
        max_keepalive_connections=connections if config.keepalive else 0,
    )
    timeout = httpx.Timeout(config.request_timeout, connect=30.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


@contextlib.asynccontextmanager
async def open_transport(config: BenchConfig) -> AsyncIterator[Send]:
    """The run's one client: an HTTP pool for the OpenAI APIs, a gRPC channel for ``grpc``."""
    if config.api == "grpc":
        from rillet.benchmark.grpc_stream import grpc_sender

        async with grpc_sender(config) as send:
            yield send
        return
    async with make_client(config) as client:
        yield lambda record: stream_request(client, config, record)


async def run_level(
    send: Send, config: BenchConfig, level: float, progress: Progress
) -> tuple[dict[str, Any], list[RequestRecord]]:
    """Run one level; return its summary row (without the run metadata) and its records."""
    planned = config.requests_for(level)
    records: list[RequestRecord] = []

    async def one(index: int) -> None:
        record = RequestRecord(index)
        records.append(record)
        await send(record)
        progress.advance(record)

    cap = config.concurrency[0] if config.request_rates else int(level)
    progress.start_level(f"{level:g}/s" if config.request_rates else f"c={level}", planned)
    before = CpuSnapshot.take(config.server_pid)
    if config.request_rates:
        tasks = [asyncio.create_task(_open_loop(one, planned, level, cap, config.seed))]
    else:
        indices = itertools.count()

        async def worker() -> None:
            while (index := next(indices)) < planned:
                await one(index)

        tasks = [asyncio.create_task(worker()) for _ in range(min(cap, planned))]
    _, still_running = await asyncio.wait(tasks, timeout=config.level_timeout)
    for task in still_running:
        task.cancel()  # stream_request marks its record cancelled
    await asyncio.gather(*still_running, return_exceptions=True)
    after = CpuSnapshot.take(config.server_pid)
    progress.end_level()

    records.sort(key=lambda r: r.index)
    row = summarize_level(
        records,
        concurrency=cap,
        num_planned=planned,
        max_tokens=config.max_tokens,
        wall=after.wall - before.wall,
        goodput=config.goodput,
    )
    if config.request_rates:
        row["request_rate"] = level
    row["hit_level_timeout"] = bool(still_running)
    row.update(after.cores_since(before))
    return row, records


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from a level's start at which its ``count`` requests arrive (Poisson)."""
    rng = random.Random(f"{seed}:{rate}")
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(count)))


async def _open_loop(
    one: Callable[[int], Awaitable[None]], planned: int, rate: float, cap: int, seed: int
) -> None:
    """Start request ``i`` at its arrival offset (or when a slot frees, under ``cap``)."""
    slots = asyncio.Semaphore(cap)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def held(index: int) -> None:
        try:
            await one(index)
        finally:
            slots.release()

    running: list[asyncio.Task[None]] = []
    try:
        for index, offset in enumerate(arrival_offsets(planned, rate, seed)):
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
            await slots.acquire()
            running.append(asyncio.create_task(held(index)))
        await asyncio.gather(*running)
    finally:  # cancelled at the level's time cap: cancel what is in flight too
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def warm_up(send: Send, config: BenchConfig, progress: Progress) -> None:
    """Untimed requests first (lazy init, caches); the first also checks the server works.

    They send the levels' exact body: a shorter ``max_tokens`` could clash with a
    ``min_tokens`` given in ``extra_body``.
    """
    for i in range(config.warmup):
        record = await send(RequestRecord(-1 - i))
        if not record.ok and i == 0:
            hint = ""
            if record.status is not None and 400 <= record.status < 500:
                hint = " (if the server rejects ignore_eos or stream_options, try "
                hint += "--no-ignore-eos / --no-usage)"
            raise WarmupFailed(f"warm-up request failed: {record.error}{hint}")
        progress.note(
            f"warm-up {i + 1}/{config.warmup}: {record.num_tokens} tokens, "
            f"TTFT {1000 * (record.ttft or 0):.0f} ms, {record.error or 'ok'}"
        )


def run_metadata(config: BenchConfig) -> dict[str, Any]:
    """Fields repeated in every JSON line, so each line stands on its own."""
    return {
        "label": config.name,
        "url": config.grpc_target if config.api == "grpc" else config.base_url,
        "api": config.api,
        "model": config.model,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "ignore_eos": config.ignore_eos,
        "loop": "open" if config.request_rates else "closed",
        "seed": config.seed,
        "include_usage": config.include_usage,
        "extra_body": dict(config.extra_body),
        "keepalive": config.keepalive,
        "server_pid": config.server_pid,
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "format": FORMAT_VERSION,
    }


async def run_benchmark(
    config: BenchConfig, progress: Progress, on_row: RowSink | None = None
) -> list[dict[str, Any]]:
    """Warm up, then run every level in order; one row per level (also fed to ``on_row``).

    Raises WarmupFailed when the server cannot serve the first request.
    """
    rows: list[dict[str, Any]] = []
    meta = run_metadata(config)
    async with open_transport(config) as send:
        await warm_up(send, config, progress)
        for level in config.levels:
            started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            spec_before = await spec_metrics.scrape(config.base_url, config.headers())
            summary, records = await run_level(send, config, level, progress)
            row = {**meta, "started_at": started_at, **summary}
            if spec_before is not None:
                spec_after = await spec_metrics.scrape(config.base_url, config.headers())
                if spec_after is not None:
                    row.update(spec_after.since(spec_before))
            rows.append(row)
            if on_row is not None:
                on_row(row, records)
            await asyncio.sleep(0.5)  # let the server settle between levels
    return rows


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":"))
