"""``rillet chat`` and ``rillet generate`` driven as a person would: in a real terminal (pty).

Keys go through the terminal's line discipline, so Enter is ``\\r`` and Ctrl-C is ``\\x03``,
which the kernel turns into SIGINT for the chat process, exactly as in a terminal emulator.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from polling import poll_until_sync
from rillet.client import Client
from server_process import ServerHandle, frozen_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STATS = r"\[(\d+) tokens, [\d.]+ tokens/s(?:, prompt (\d+) tokens)?\]"
CTRL_C = "\x03"


def _default_sigint() -> None:
    """In a child before exec: SIGINT as a terminal's foreground job gets it. A shell without
    job control starts background jobs (a backgrounded test run) with SIGINT ignored, which
    their children inherit, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A command running on a pseudo-terminal, with what it printed so far."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "TERM": "dumb"}  # no colours or bracketed-paste escapes
        pid, fd = pty.fork()
        if pid == 0:  # the child: its controlling terminal is the pty
            _default_sigint()
            os.execvpe(argv[0], argv, env)
        self.pid, self.fd = pid, fd
        self.transcript = ""
        self._seen = 0

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Wait until ``pattern`` appears in output not matched before; returns the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.DOTALL)
        while True:
            match = regex.search(self.transcript, self._seen)
            if match:
                self._seen = match.end()
                return match
            ready, _, _ = select.select([self.fd], [], [], max(0, deadline - time.monotonic()))
            chunk = self._read() if ready else b""
            if not chunk:
                why = "timed out" if not ready else "the program ended"
                raise AssertionError(f"{why} waiting for {pattern!r}; got:\n{self.transcript}")
            # The terminal turns "\n" into "\r\n"; undo it so patterns stay readable.
            self.transcript += chunk.decode(errors="replace").replace("\r\n", "\n")

    def wait_until_blocked_on_input(self, timeout: float = 60) -> None:
        """Until the program sleeps in select() on the terminal (its kernel wait channel):
        readline waiting for a key, where a SIGINT interrupts it. CPython checks signals
        only when that select() fails with EINTR, so one that lands anywhere else at the
        prompt is lost until the next signal."""
        deadline = time.monotonic() + timeout
        wchan = Path(f"/proc/{self.pid}/wchan")
        while time.monotonic() < deadline:
            channel = wchan.read_text()  # select() sleeps in poll_schedule_timeout
            if "poll_schedule_timeout" in channel or "select" in channel:
                return
            time.sleep(0.01)
        raise AssertionError(f"never waited for a key: {wchan.read_text()!r}")

    def _read(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except OSError:  # EIO: the other side of the pty is gone
            return b""

    def wait(self, timeout: float = 30) -> int:
        """The exit code, once the program has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:  # keep draining so the program never blocks on a full pty
                self.transcript += self._read().decode(errors="replace")
        raise AssertionError(f"still running; output:\n{self.transcript}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def chat(server: ServerHandle) -> Iterator[Terminal]:
    argv = [sys.executable, "-m", "rillet", "chat", "--url", server.url]
    terminal = Terminal([*argv, "--max-tokens", "12", "--temperature", "0"])
    yield terminal
    terminal.kill()


def _running(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r"^rillet_requests_running (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def _wait_running(url: str, value: float) -> None:
    poll_until_sync(lambda: _running(url) == value, what=f"rillet_requests_running == {value}")


def _turn(terminal: Terminal, line: str) -> tuple[str, int, int]:
    """Type one message; returns (reply text, reply tokens, prompt tokens) from the screen."""
    terminal.expect(r">>> ")
    terminal.type(line + "\r")
    match = terminal.expect(re.escape(line) + r"\n(.*?)\n" + STATS + r"\n")
    return match.group(1), int(match.group(2)), int(match.group(3) or 0)


def test_chat_keeps_the_conversation_and_ctrl_c_stops_a_reply(
    chat: Terminal, server: ServerHandle
) -> None:
    first_line, second_line = "My name is Ada.", "What is my name?"
    first, first_tokens, first_prompt = _turn(chat, first_line)
    second, _, second_prompt = _turn(chat, second_line)
    assert first and second

    # The second request carried the first turn: the server counted its tokens...
    assert second_prompt > first_prompt + first_tokens
    # ...and (greedy) replied exactly what it replies to that whole conversation.
    history = [
        {"role": "user", "content": first_line},
        {"role": "assistant", "content": first},
        {"role": "user", "content": second_line},
    ]
    with Client(server.url) as client:
        again = client.chat(history, max_tokens=12, temperature=0).choices[0].message.content
    assert second == again

    # Third turn: a long reply, stopped with Ctrl-C once it is under way.
    chat.expect(r">>> ")
    chat.type("/set max_tokens 400\r")
    chat.expect(r"\[max_tokens = 400\]")
    chat.expect(r">>> ")
    chat.type("Count from 1 to 200, separated by commas.\r")
    chat.expect(r"separated by commas\.\n.*\d")  # the first tokens are on screen
    with frozen_engine(server):  # the reply is under way and stays so until Ctrl-C is in
        assert _running(server.url) == 1
        chat.type(CTRL_C)
        chat.expect(r"\[stopped\] " + STATS)
    _wait_running(server.url, 0)  # the server aborted the generation

    # The chat goes on, with the stopped reply in the conversation.
    chat.expect(r">>> ")
    chat.type("/set max_tokens 8\r")
    _, _, fourth_prompt = _turn(chat, "Thanks!")
    assert fourth_prompt > second_prompt
    chat.expect(r">>> ")
    # Ctrl-C at the prompt leaves, once readline is waiting for a key.
    chat.wait_until_blocked_on_input()
    chat.type(CTRL_C)
    assert chat.wait() == 0


def test_chat_reports_an_unreachable_server_and_goes_on() -> None:
    terminal = Terminal([sys.executable, "-m", "rillet", "chat", "--url", "http://127.0.0.1:9"])
    try:
        terminal.expect(r">>> ")
        terminal.type("hello\r")
        terminal.expect(r"error: cannot reach http://127\.0\.0\.1:9")
        terminal.expect(r">>> ")
        terminal.type("\x04")  # Ctrl-D at the prompt leaves too
        assert terminal.wait() == 0
    finally:
        terminal.kill()


def test_generate_streams_to_stdout_and_ctrl_c_aborts(server: ServerHandle) -> None:
    prompt = "Count from 1 to 200, separated by commas."
    argv = [sys.executable, "-m", "rillet", "generate", prompt, "--url", server.url]
    with subprocess.Popen(
        [*argv, "--max-new-tokens", "400"], stdout=subprocess.PIPE, preexec_fn=_default_sigint
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.read1(64)  # type: ignore[attr-defined]
        with frozen_engine(server):  # still generating, and it stays so until Ctrl-C is in
            assert first and proc.poll() is None  # output arrives while it is generating
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 130
    _wait_running(server.url, 0)

    short = subprocess.run(
        [*argv, "--max-new-tokens", "8"], capture_output=True, text=True, timeout=60
    )
    with Client(server.url) as client:
        expected = client.generate(prompt, max_new_tokens=8).generated_text
    assert short.returncode == 0 and short.stdout == expected + "\n"
