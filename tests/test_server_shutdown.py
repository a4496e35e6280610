"""SIGTERM on ``rillet serve``: new connections are refused at once, a stream that can finish
within the grace period finishes, one that cannot ends with an error event and ``[DONE]``,
and the process exits."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from server_process import ServerHandle, child_pids, is_running, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GRACE_S = 4


@pytest.fixture
def own_server() -> Iterator[ServerHandle]:
    handle = start_server(["--shutdown-grace", str(GRACE_S)])
    yield handle
    handle.stop()


def _completion(max_tokens: int) -> dict[str, object]:
    return {
        "prompt": "Count: one, two,",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


def _events(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_sigterm_drains_then_ends_what_is_left(own_server: ServerHandle) -> None:
    url = own_server.url + "/v1/completions"
    with (
        httpx.stream("POST", url, json=_completion(4000), timeout=60) as long,
        httpx.stream("POST", url, json=_completion(12), timeout=60) as short,
    ):
        long_lines, short_lines = long.iter_lines(), short.iter_lines()
        first_long = next(line for line in long_lines if line.startswith("data: "))
        first_short = next(line for line in short_lines if line.startswith("data: "))
        engine_pids = child_pids(own_server.proc.pid)
        assert engine_pids, "rillet serve runs its engine core in a child process"
        own_server.proc.send_signal(signal.SIGTERM)

        refused = False
        deadline = time.monotonic() + GRACE_S - 1
        while not refused and time.monotonic() < deadline:
            try:
                httpx.get(own_server.url + "/health", timeout=1)
                time.sleep(0.05)
            except httpx.TransportError:
                refused = True
        assert refused, "still accepting connections while draining"

        short_events = [first_short.removeprefix("data: "), *_events(short_lines)]
        assert short_events[-1] == "[DONE]"
        assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
        assert not any("error" in json.loads(e) for e in short_events[:-1])

        long_events = [first_long.removeprefix("data: "), *_events(long_lines)]
        assert long_events[-1] == "[DONE]"
        error = json.loads(long_events[-2])["error"]
        assert error["type"] == "incomplete_generation"
        assert 1 < len(long_events) < 4000

    assert own_server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in own_server.log()
    for pid in engine_pids:  # the engine process went with it
        assert not is_running(pid)


def test_engine_in_process_serves_the_same_tokens_and_stops(server: ServerHandle) -> None:
    """``--engine-in-process`` (the core on a thread, no child process) against the default
    server: one greedy request alone gives the same tokens either way."""
    body = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 12}}
    own = start_server(["--engine-in-process"])
    try:
        assert child_pids(own.proc.pid) == []
        answers = [
            httpx.post(handle.url + "/generate", json=body, timeout=60).json()["generated_text"]
            for handle in (own, server)
        ]
        assert answers[0] == answers[1] and answers[0]
    finally:
        assert own.stop() in (0, -signal.SIGTERM)
