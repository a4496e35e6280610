"""One streamed request, timed: TTFT, the gaps between content deltas, the token count.

Times are taken on this side of the socket when each SSE line is read, so they include
the server's batching of writes and the network stack, as a user's client would see them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from rillet.benchmark.workload import BenchConfig


@dataclass
class RequestRecord:
    """What one request produced; times in seconds from just before the request was sent.

    ``ok`` is False when ``error`` is set (an HTTP error, an error event in the stream,
    a timeout, no content or a stream cut before its end) and when the request was
    ``cancelled`` at a level's time cap; its partial output is still recorded.
    """

    index: int
    #: What the request asked for (its own length in a dataset, else the run's).
    max_tokens: int | None = None
    status: int | None = None
    ttft: float | None = None
    latency: float | None = None
    gaps: list[float] = field(default_factory=list)
    num_deltas: int = 0
    num_chars: int = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    #: The server's own account of the first token (``--server-timing``: the final event's
    #: ``rillet_timing``), in seconds: admission -> scheduled, scheduled -> sampled, and
    #: admission -> its event emitted.
    queued: float | None = None
    prefill: float | None = None
    server_ttft: float | None = None
    _last: float = field(default=0.0, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled

    def add_delta(self, text: str, now: float, start: float) -> None:
        """A piece of content read at ``now`` (perf_counter) of a request sent at ``start``:
        the first sets TTFT, the others add a gap since the previous one."""
        if self.ttft is None:
            self.ttft = now - start
        else:
            self.gaps.append(now - start - self._last)
        self._last = now - start
        self.num_deltas += 1
        self.num_chars += len(text)

    def add_server_timing(self, timing: Any) -> None:
        """Keep the summary of a ``rillet_timing`` object (only the final event has one)."""
        if isinstance(timing, dict) and timing.get("ttft_s") is not None:
            self.queued = timing.get("queued_s")
            self.prefill = timing.get("prefill_s")
            self.server_ttft = float(timing["ttft_s"])

    def ttft_split(self) -> dict[str, float] | None:
        """This request's TTFT in parts that add up to it: ``queue`` and ``prefill`` (the
        engine's), ``server`` (the server's own delivery: the rest of its ``ttft_s``) and
        ``network`` (the client's TTFT minus the server's: the hops both ways, HTTP parsing
        before admission, reading). None without the server's timing."""
        if None in (self.ttft, self.server_ttft, self.queued, self.prefill):
            return None
        assert self.ttft is not None and self.server_ttft is not None
        assert self.queued is not None and self.prefill is not None
        return {
            "queue": self.queued,
            "prefill": self.prefill,
            "server": self.server_ttft - self.queued - self.prefill,
            "network": self.ttft - self.server_ttft,
        }

    @property
    def num_tokens(self) -> int:
        """Generated tokens: the server's usage count, else one token per content delta."""
        return self.usage_tokens if self.usage_tokens is not None else self.num_deltas

    def to_json(self) -> dict[str, Any]:
        """A flat JSON object for ``--requests-out`` (times in milliseconds)."""
        return {
            "index": self.index,
            "ok": self.ok,
            "max_tokens": self.max_tokens,
            "status": self.status,
            "error": self.error,
            "cancelled": self.cancelled,
            "ttft_ms": _ms(self.ttft),
            "latency_ms": _ms(self.latency),
            "num_tokens": self.num_tokens,
            "usage_tokens": self.usage_tokens,
            "prompt_tokens": self.prompt_tokens,
            "num_deltas": self.num_deltas,
            "num_chars": self.num_chars,
            "finish_reason": self.finish_reason,
            "gaps_ms": [_ms(g) for g in self.gaps],
            "ttft_split_ms": {k: _ms(v) for k, v in (self.ttft_split() or {}).items()} or None,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


async def stream_request(
    client: httpx.AsyncClient,
    config: BenchConfig,
    record: RequestRecord,
) -> RequestRecord:
    """Send request ``record.index`` and fill ``record`` as the stream arrives.

    Never raises for a failed request (the failure goes into ``record.error``), except
    CancelledError, which marks the record cancelled and propagates.
    """
    prompt = config.prompt(record.index)
    record.max_tokens = config.max_tokens_of(prompt)
    body = config.body(prompt)
    start = time.perf_counter()
    saw_done = False
    try:
        # httpx timeouts bound each read, not the whole stream: this bounds the request.
        async with (
            asyncio.timeout(config.request_timeout),
            client.stream("POST", config.endpoint, json=body, headers=config.headers()) as resp,
        ):
            record.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {' '.join(text.split())[:200]}"
                return record
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    saw_done = True
                    break
                text = _read_event(payload, config, record)
                if text:
                    record.add_delta(text, now, start)
        record.latency = time.perf_counter() - start
        if record.error is None:
            if record.num_deltas == 0:
                record.error = "no content in the stream"
            elif not saw_done and record.finish_reason is None:
                record.error = "stream ended before its finish_reason or [DONE]"
    except TimeoutError:
        record.error = f"timeout after {config.request_timeout:g}s"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    except asyncio.CancelledError:
        record.cancelled = True
        raise
    return record


def _read_event(payload: str, config: BenchConfig, record: RequestRecord) -> str:
    """Fold one SSE data payload into ``record``; return its content text ('' if none)."""
    try:
        event = json.loads(payload)
    except ValueError:
        record.error = f"SSE data is not JSON: {payload[:80]!r}"
        return ""
    if not isinstance(event, dict):
        record.error = f"SSE data is not an object: {payload[:80]!r}"
        return ""
    if event.get("error") and not event.get("choices"):
        record.error = f"error event: {str(event['error'])[:160]}"
        return ""
    record.add_server_timing(event.get("rillet_timing"))
    usage = event.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        record.usage_tokens = int(usage["completion_tokens"])
        record.prompt_tokens = usage.get("prompt_tokens")
    text = ""
    for choice in event.get("choices") or []:
        if config.api == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
        if choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])
    return text
