"""Streams under speculation with the draft-model proposer, through the real app and engine:
TGI's ``/generate_stream`` sends one event per token even when a step accepted several,
OpenAI's stream merges a step's tokens into one delta, and both carry the plain output."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app_server import serving
from free_drafts import free_speculator
from rillet import LLM, SamplingParams
from rillet.config import EngineConfig
from rillet.engine.async_engine import AsyncEngine
from rillet.engine.speculation import Speculator
from rillet.server.http.app import create_app
from sse_text import data_events

PROMPT = "the cat sat on the mat. the cat"
OPTIONS: dict[str, object] = {"dtype": "float32", "seed": 0, "num_kv_blocks": 256}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def plain_output(tiny_model_dir: Path) -> tuple[list[int], str]:
    plain = LLM(str(tiny_model_dir), **OPTIONS)
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    (want,) = plain.generate([PROMPT], params)
    return want.token_ids, want.text


def drafting_engine(tiny_model_dir: Path) -> tuple[AsyncEngine, Speculator]:
    """A tiny model drafting for itself, every draft paying (the policy's costs zeroed)."""
    config = EngineConfig(
        model=str(tiny_model_dir),
        speculative=f"draft:{tiny_model_dir}",
        **OPTIONS,  # type: ignore[arg-type]
    )
    engine = AsyncEngine.from_config(config)
    speculator = free_speculator(engine.core.scheduler.speculator)
    engine.core.scheduler.speculator = speculator
    return engine, speculator


async def test_tgi_streams_one_event_per_token_openai_merges(
    tiny_model_dir: Path, plain_output: tuple[list[int], str]
) -> None:
    want_ids, want_text = plain_output
    engine, speculator = drafting_engine(tiny_model_dir)
    async with (
        serving(create_app(engine)) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        tgi = await client.post(
            "/generate_stream",
            json={
                "inputs": PROMPT,
                "parameters": {"max_new_tokens": MAX_TOKENS, "do_sample": False},
            },
        )
        accepted = speculator.counters.num_accepted_tokens["draft"]
        oai = await client.post(
            "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            },
        )
    await engine.shutdown()
    events = data_events(tgi.text)
    assert [e["token"]["id"] for e in events] == want_ids  # one event per token
    assert [e["index"] for e in events] == list(range(1, MAX_TOKENS + 1))
    assert events[-1]["generated_text"] == want_text
    assert accepted > MAX_TOKENS // 2  # several tokens a step, split into events
    chunks = [c for c in data_events(oai.text) if c["choices"] and c["choices"][0]["text"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want_text
    assert len(chunks) < MAX_TOKENS // 2  # a step's accepted run is one delta
