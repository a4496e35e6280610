"""Engine invariants on the real bundled model and a tiny random one.

Batching must not change results; streaming must equal non-streaming; aborts, preemption
and prefix caching must leave outputs intact and the KV cache empty afterwards.

These run in float32, where a row's matmul result does not depend on how many rows share
the batch. In bfloat16 (the CPU serving default) oneDNN's kernels round differently for
different batch shapes, so a near-tie can flip a greedy pick under load: that is a
property of the dtype, measured in bench/RESULTS.md, not something these tests check.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from rillet import LLM, SamplingParams
from rillet.config import EngineConfig
from rillet.engine.async_engine import AsyncEngine
from rillet.errors import GenerationError, ModelLoadError, ValidationError
from rillet.protocol import FinishReason

# Sixteen prompts of different lengths, some asking for CJK text and emoji.
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4, 5,",
    "请用中文介绍一下你自己。",
    "日本の首都は",
    "Emoji time: 🤗😄👍🏽 means",
    "def add(a, b):\n    return",
    "Once upon a time, in a land far, far away, there lived a",
    "Translate to French: good morning, my friend.",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Q: What is the boiling point of water?\nA:",
    "List three colors:",
    "🍕🍔🍟 are foods that",
    "In 1492, Columbus",
    "Explain photosynthesis in one sentence, please, using simple words for a child.",
]


@pytest.fixture(scope="module")
def bundled() -> LLM:
    return LLM(dtype="float32", seed=0)


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def test_greedy_alone_equals_batched(bundled: LLM) -> None:
    together = bundled.generate(PROMPTS, greedy())
    for prompt, batched in zip(PROMPTS, together, strict=True):
        alone = bundled.generate([prompt], greedy())[0]
        assert alone.token_ids == batched.token_ids, prompt
        assert alone.text == batched.text


def test_seeded_sampling_alone_equals_batched(bundled: LLM) -> None:
    params = [
        SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1000 + i)
        for i in range(len(PROMPTS))
    ]
    together = bundled.generate(PROMPTS, params)
    # Put other sampled requests around it, in another order, to change the batch.
    for i in (0, 4, 6, 15):
        others = [p for j, p in enumerate(PROMPTS) if j != i][:5]
        batch = bundled.generate(
            [*others, PROMPTS[i]],
            [SamplingParams(max_new_tokens=10, temperature=1.0) for _ in others] + [params[i]],
        )
        assert batch[-1].token_ids == together[i].token_ids
        assert bundled.generate([PROMPTS[i]], params[i])[0].token_ids == together[i].token_ids
    assert len({tuple(c.token_ids) for c in together}) > 1


async def _stream(
    engine: AsyncEngine, prompt: str, params: SamplingParams
) -> tuple[str, list[int]]:
    text, ids, steps = "", [], [0]
    async for out in engine.generate(engine.make_request(prompt, params)):
        assert "\ufffd" not in out.text
        if out.tokens and not ids:  # the first token's delta: the server's timing split
            assert out.first_scheduled_time is not None and out.first_token_time is not None
            assert out.first_token_time >= out.first_scheduled_time
        text += out.text
        ids.extend(t.id for t in out.tokens)
        assert out.step > steps[-1]  # each delta from a later engine step
        steps.append(out.step)
    return text, ids


@pytest.fixture(scope="module")
def async_bundled() -> AsyncEngine:
    return AsyncEngine.from_config(EngineConfig(dtype="float32"))


async def test_stream_equals_non_stream_with_cjk_and_emoji(
    bundled: LLM, async_bundled: AsyncEngine
) -> None:
    params = greedy(24)
    streamed = await asyncio.gather(*(_stream(async_bundled, p, params) for p in PROMPTS))
    for prompt, whole, (text, ids) in zip(
        PROMPTS, bundled.generate(PROMPTS, params), streamed, strict=True
    ):
        assert ids == whole.token_ids, prompt
        assert text == whole.text, prompt
        assert text == bundled.tokenizer.decode(ids)
    # Some of these prompts really do produce non-ASCII output.
    assert any(any(ord(ch) > 0x2E80 for ch in t) for t, _ in streamed)


async def test_stream_with_stop_string_equals_non_stream(
    bundled: LLM, async_bundled: AsyncEngine
) -> None:
    base = bundled.generate(["1, 2, 3, 4, 5,"], greedy(20))[0].text
    stop = base.strip().split(",")[2] + ","  # a string the model will produce
    for include in (False, True):
        params = SamplingParams(
            max_new_tokens=20, temperature=0.0, stop=[stop], include_stop_str_in_output=include
        )
        whole = bundled.generate(["1, 2, 3, 4, 5,"], params)[0]
        text, _ = await _stream(async_bundled, "1, 2, 3, 4, 5,", params)
        assert whole.finish_reason is FinishReason.STOP_SEQUENCE
        assert text == whole.text
        assert text.endswith(stop) if include else stop not in text


@pytest.mark.parametrize("own_process", [False, True], ids=["thread", "process"])
async def test_abort_every_tenth_of_100(tiny_model_dir: Path, own_process: bool) -> None:
    engine = AsyncEngine.from_config(
        EngineConfig(model=str(tiny_model_dir), dtype="float32", num_kv_blocks=512),
        own_process=own_process,
    )
    reference = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=512)
    prompts = [f"request number {i}: " + "lorem ipsum " * (i % 7) for i in range(100)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in reference.generate(prompts, params)]

    async def run(i: int) -> list[int] | None:
        ids: list[int] = []
        async for out in engine.generate(engine.make_request(prompts[i], params)):
            ids.extend(t.id for t in out.tokens)
            if i % 10 == 0 and len(ids) >= 3:
                return None  # leaves the stream early: the engine must abort it
        return ids

    results = await asyncio.gather(*(run(i) for i in range(100)))
    for i, got in enumerate(results):
        if i % 10:
            assert got == expected[i], i
    await _until_idle(engine)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_used_blocks == 0
    await engine.shutdown()


async def _until_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_used_blocks == 0:
            return
        await asyncio.sleep(0.01)


def test_preemption_keeps_greedy_output(tiny_model_dir: Path) -> None:
    prompts = [f"story {i}: " + "once upon a time " * (3 + i) for i in range(8)]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    ample = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=1024).generate(prompts, params)
    # 8 requests each need ~5-8 blocks of 16 at the end: 24 blocks cannot hold them all.
    tight = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=24, max_model_len=384)
    starved = tight.generate(prompts, params)
    assert tight.core.counters.num_preemptions > 0
    for a, b in zip(ample, starved, strict=True):
        assert a.token_ids == b.token_ids
    assert tight.core.scheduler.block_manager.num_used_blocks == 0


def test_prefix_caching_computes_only_new_tokens(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256, block_size=16)
    prefix = "You are a helpful assistant. Answer briefly and kindly. " * 20
    first, second = prefix + "Question one?", prefix + "Another question entirely?"
    params = greedy(8)
    llm.generate([first], params)
    before = llm.core.counters.num_prompt_tokens_computed
    cached = llm.generate([second], params)[0]
    computed = llm.core.counters.num_prompt_tokens_computed - before
    first_ids, second_ids = llm.tokenizer.encode(first), llm.tokenizer.encode(second)
    common = next(
        (i for i, (a, b) in enumerate(zip(first_ids, second_ids, strict=False)) if a != b),
        min(len(first_ids), len(second_ids)),
    )
    shared = common // 16 * 16  # only whole blocks are shared
    assert shared >= 160
    assert cached.num_cached_tokens == shared
    assert computed == len(second_ids) - shared
    fresh = LLM(
        str(tiny_model_dir), dtype="float32", num_kv_blocks=256, enable_prefix_caching=False
    )
    assert fresh.generate([second], params)[0].token_ids == cached.token_ids


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(), r"^prompt must not be empty$"),
        ([], SamplingParams(), r"^prompt token ids must not be empty$"),
        (
            "hello " * 2000,
            SamplingParams(),
            r"^prompt token ids must be fewer than max_model_len \(512\)",
        ),
        ([10**6], SamplingParams(), r"^prompt token ids must be integers in \[0, "),
        ("hi", SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.5), "top_p"),
        ("hi", SamplingParams(temperature=-1.0), "temperature"),
        ("hi", SamplingParams(top_logprobs=99), "top_logprobs"),
    ],
)
def test_bad_requests_raise_validation_errors(
    tiny_model_dir: Path, prompt: str | list[int], params: SamplingParams, message: str
) -> None:
    llm = _tiny_llm(tiny_model_dir)
    with pytest.raises(ValidationError, match=message):
        llm.generate([prompt], params)


_TINY: dict[Path, LLM] = {}


def _tiny_llm(folder: Path) -> LLM:
    if folder not in _TINY:
        _TINY[folder] = LLM(str(folder), dtype="float32", num_kv_blocks=128, max_model_len=512)
    return _TINY[folder]


def test_unknown_model_path_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))


@pytest.mark.timeout(120)
async def test_a_failed_step_fails_open_streams_and_the_engine_keeps_serving(
    tiny_model_dir: Path,
) -> None:
    """Fault injection: one model step raises. Every stream in flight gets a
    GenerationError, their blocks are freed, and the next request is served normally."""
    engine = AsyncEngine.from_config(
        EngineConfig(model=str(tiny_model_dir), dtype="float32", num_kv_blocks=256)
    )
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    execute = engine.core.runner.execute
    calls = 0

    def fail_on_the_fifth_step(step):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("injected fault")
        return execute(step)

    engine.core.runner.execute = fail_on_the_fifth_step  # type: ignore[method-assign]

    async def consume(prompt: str) -> BaseException | None:
        try:
            async for _ in engine.generate(engine.make_request(prompt, params)):
                pass
        except GenerationError as exc:
            return exc
        return None

    errors = await asyncio.gather(*(consume(f"prompt {i}") for i in range(4)))
    assert all(isinstance(e, GenerationError) and "injected fault" in str(e) for e in errors)
    await _until_idle(engine)
    assert engine.stats().num_used_blocks == 0
    _, ids = await _stream(engine, "after the fault", params)
    assert len(ids) == 30
    await engine.shutdown()


def test_an_8bit_kv_cache_keeps_batching_streaming_and_prefix_invariants(
    tiny_model_dir: Path,
) -> None:
    """With ``kv_cache_dtype="int8"``: batched equals alone, a prefix-cache hit equals a cold
    run (the prompt's own chunk reads its K/V back from the 8-bit cache too), preemption
    and recompute change nothing, and every block comes back."""
    int8 = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256, kv_cache_dtype="int8")
    assert int8.core.runner.kv_caches[0][0].dtype == torch.int8
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    together = int8.generate(PROMPTS[:8], params)
    for prompt, batched in zip(PROMPTS[:8], together, strict=True):
        assert int8.generate([prompt], params)[0].token_ids == batched.token_ids, prompt
    prefix = "You are a helpful assistant. Answer briefly and kindly. " * 20
    int8.generate([prefix + "Question one?"], params)
    cached = int8.generate([prefix + "Another question entirely?"], params)[0]
    assert cached.num_cached_tokens >= 160
    cold = LLM(
        str(tiny_model_dir),
        dtype="float32",
        num_kv_blocks=256,
        kv_cache_dtype="int8",
        enable_prefix_caching=False,
    )
    assert cold.generate([prefix + "Another question entirely?"], params)[0].token_ids == (
        cached.token_ids
    )
    tight = LLM(
        str(tiny_model_dir), dtype="float32", num_kv_blocks=24, max_model_len=384,
        kv_cache_dtype="int8",
    )  # fmt: skip
    stories = [f"story {i}: " + "once upon a time " * (3 + i) for i in range(8)]
    long_params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    starved = tight.generate(stories, long_params)
    assert tight.core.counters.num_preemptions > 0
    ample = cold.generate(stories, long_params)
    assert [c.token_ids for c in starved] == [c.token_ids for c in ample]
    assert tight.core.scheduler.block_manager.num_used_blocks == 0
    # and the 8 bits do change the numbers: the same model with the default cache differs
    full = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256)
    scored = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=True)
    full_logprobs = [t.logprob for t in full.generate([PROMPTS[8]], scored)[0].tokens]
    int8_logprobs = [t.logprob for t in int8.generate([PROMPTS[8]], scored)[0].tokens]
    assert None not in full_logprobs and full_logprobs != int8_logprobs
