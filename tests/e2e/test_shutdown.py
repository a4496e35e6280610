"""SIGTERM on ``rillet serve``: new connections are refused at once, a stream still in flight
after the grace period ends with an error event and ``[DONE]``, and the process exits with
its engine. (A stream that finishes within the grace period finishing normally is checked
on a held fake engine: ``server/test_service.py`` and ``server/http/test_http_doors.py``.)"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from polling import poll_until_sync
from server_process import ServerHandle, child_pids, frozen_engine, is_running, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GRACE_S = 1


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


def test_sigterm_refuses_new_work_then_ends_what_is_left(own_server: ServerHandle) -> None:
    url = own_server.url + "/v1/completions"
    with (
        contextlib.ExitStack() as thaw,
        httpx.stream("POST", url, json=_completion(4000), timeout=60) as long,
    ):
        lines = long.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # Frozen, the engine can neither advance the stream nor finish it: it is still in
        # flight when the grace period ends, however fast the engine would have been.
        engine_pids = thaw.enter_context(frozen_engine(own_server))
        own_server.proc.send_signal(signal.SIGTERM)

        refused = False
        deadline = time.monotonic() + 30
        while not refused and time.monotonic() < deadline:
            try:
                httpx.get(own_server.url + "/health", timeout=1)
                time.sleep(0.05)
            except httpx.TransportError:
                refused = True
        assert refused, "still accepting connections while draining"

        # After the grace period the server stops the (stuck) engine, killing it when it
        # does not answer, and ends the stream in-band.
        events = [first.removeprefix("data: "), *_events(lines)]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "incomplete_generation"
        tokens = [json.loads(e) for e in events[:-2]]
        assert 1 <= len(tokens) < 4000 and all(t["choices"][0]["text"] for t in tokens)

    assert own_server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in own_server.log()
    # The server's children go with it: the engine process, and multiprocessing's resource
    # tracker (stopped with it by frozen_engine), which exits once it reads the server's end
    # of its pipe close: just after the server, not before it (a fresh clone's run caught
    # one still running at the first look).
    for pid in engine_pids:
        poll_until_sync(lambda pid=pid: not is_running(pid), what=f"child {pid} exits")


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
