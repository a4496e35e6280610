"""The engine core in its own process (``AsyncEngine.from_config(..., own_process=True)``).

The stream-level invariants (same tokens as the offline engine, aborts free every block)
run on both backends in test_engine_invariants.py; these are the process's own failure
modes: a load that fails in the child, a child that dies mid-stream, a clean shutdown,
and a parent that dies without one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polling import poll_until_sync
from rillet import LLM, SamplingParams
from rillet.config import EngineConfig
from rillet.engine.async_engine import AsyncEngine
from rillet.engine.engine_process import EngineProcess
from rillet.errors import EngineDeadError, ModelLoadError
from rillet.protocol import FinishReason
from server_process import is_running

pytestmark = pytest.mark.timeout(120)


def _own_process(model: Path) -> tuple[AsyncEngine, EngineProcess]:
    config = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=256)
    engine = AsyncEngine.from_config(config, own_process=True)
    backend = engine._backend
    assert isinstance(backend, EngineProcess)
    return engine, backend


def test_a_model_that_fails_to_load_is_a_model_load_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError):
        AsyncEngine.from_config(EngineConfig(model=str(broken)), own_process=True)


async def test_stop_strings_end_the_stream_as_in_process(tiny_model_dir: Path) -> None:
    """Stop strings are matched in the parent and reach the core one step later: the
    stream must still end exactly where the offline engine ends it."""
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    offline = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256)
    text = offline.generate(["the stop test"], params)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    # Room for ~1000 more tokens: a child that never heard "finish" would run on for seconds.
    params = SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True, stop=[stop])
    expected = offline.generate(["the stop test"], params)[0]
    assert expected.finish_reason is FinishReason.STOP_SEQUENCE

    engine, _ = _own_process(tiny_model_dir)
    streamed, finish = "", None
    async for out in engine.generate(engine.make_request("the stop test", params)):
        streamed += out.text
        finish = out.finish_reason
    assert (streamed, finish) == (expected.text, FinishReason.STOP_SEQUENCE)
    for _ in range(50):  # the child frees the request when the "finish" arrives
        if engine.stats().num_used_blocks == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().num_running == 0 and engine.stats().num_used_blocks == 0
    await engine.shutdown()


async def test_a_dead_engine_process_fails_open_streams(tiny_model_dir: Path) -> None:
    engine, backend = _own_process(tiny_model_dir)
    params = SamplingParams(max_new_tokens=100_000, temperature=0.0, ignore_eos=True)
    stream = engine.generate(engine.make_request("run until killed", params))
    await anext(stream)
    assert backend.pid is not None
    os.kill(backend.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError):
        async for _ in stream:
            pass
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        await anext(engine.generate(engine.make_request("after", params)))
    await engine.shutdown()


async def test_shutdown_ends_the_engine_process(tiny_model_dir: Path) -> None:
    engine, backend = _own_process(tiny_model_dir)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    async for _ in engine.generate(engine.make_request("hello", params)):
        pass
    assert backend.pid is not None and is_running(backend.pid)
    await engine.shutdown(timeout=10)
    assert not is_running(backend.pid)


async def test_shutdown_without_a_request_ends_the_engine_process(tiny_model_dir: Path) -> None:
    engine, backend = _own_process(tiny_model_dir)
    assert backend.pid is not None
    await engine.shutdown(timeout=30)
    assert not is_running(backend.pid)
    assert backend.exitcode == 0, "the child was killed at the timeout, not stopped"


def test_the_engine_process_exits_when_its_parent_is_killed(tiny_model_dir: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from rillet.config import EngineConfig
                from rillet.engine.engine_process import EngineProcess
                process = EngineProcess(EngineConfig(model={str(tiny_model_dir)!r}))
                print(process.pid, flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert is_running(child)
    parent.kill()
    parent.wait()
    poll_until_sync(lambda: not is_running(child), what="the orphaned engine process exits")
