"""The draft-model proposer (``--speculative draft:NAME``) on tiny random models that share
the bundled tokenizer: greedy output identical with and without it (stop strings and a
max_tokens inside accepted runs included), seeded and sampled rows, every KV block back in
both caches, and a draft of another tokenizer refused in one line.

The policy's costs are zeroed (:func:`always_draft`, ``tests/support/free_drafts.py``): two
tiny models of one size would never pay for each other, and these tests are about
correctness.

float32, where a row's result does not depend on the batch's shape.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_models import write_tiny_model
from free_drafts import free_speculator
from rillet import LLM, ModelLoadError, SamplingParams
from rillet.engine.draft_model import DraftModelProposer
from rillet.engine.inputs import build_request
from rillet.engine.speculation import Speculator
from rillet.protocol import FinishReason
from target_distribution import chi_square_p_value, three_token_counts, three_token_distribution

PROMPTS = [
    "1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
    "def add(a, b):\n    return a + b\n\ndef",
    "the cat sat on the mat. the cat",
    "Hi",
    "Copy this line exactly: red green blue red green blue",
]
OPTIONS: dict[str, object] = {"dtype": "float32", "seed": 0, "num_kv_blocks": 512}


@pytest.fixture(scope="module")
def near_draft(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The target's weights plus noise: it agrees with the target often, not always."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-draft"), seed=0)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    noise = torch.Generator().manual_seed(1)
    noisy = {
        name: w + 0.02 * torch.randn(w.shape, generator=noise) * w.std()
        for name, w in weights.items()
    }
    save_file(noisy, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def always_draft(llm: LLM, k: int = 4, max_num_seqs: int = 16) -> Speculator:
    """Replace the engine's speculator by one whose every draft pays."""
    fresh = free_speculator(
        llm.core.scheduler.speculator,
        num_speculative_tokens=k,
        max_num_seqs=max_num_seqs,
        max_step_rows=1 << 20,
    )
    llm.core.scheduler.speculator = fresh
    return fresh


def drafter_of(llm: LLM) -> DraftModelProposer:
    drafter = llm.core.runner.drafter
    assert isinstance(drafter, DraftModelProposer)
    return drafter


def outputs(llm: LLM, params: SamplingParams) -> list[tuple[object, ...]]:
    return [
        (c.token_ids, c.text, c.finish_reason, [t.logprob for t in c.tokens])
        for c in llm.generate(PROMPTS, params)
    ]


def assert_same(plain: list[tuple[object, ...]], spec: list[tuple[object, ...]]) -> None:
    """Same tokens, text and finish reasons; the same logprobs within float32 rounding."""
    for (*a, lp_a), (*b, lp_b) in zip(plain, spec, strict=True):
        assert a == b
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_greedy_output_is_unchanged(tiny_model_dir: Path, near_draft: Path) -> None:
    plain = LLM(str(tiny_model_dir), **OPTIONS)
    spec = LLM(str(tiny_model_dir), speculative=f"draft:{near_draft}", **OPTIONS)
    speculator = always_draft(spec)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    expected = outputs(plain, params)
    assert_same(expected, outputs(spec, params))
    drafted = speculator.counters.num_draft_tokens["draft"]
    accepted = speculator.counters.num_accepted_tokens["draft"]
    # Both accepted runs and rejections happened (the test is not vacuous either way).
    assert drafted > 100 and 0.2 * drafted < accepted < 0.95 * drafted, (drafted, accepted)
    assert drafter_of(spec).num_forwards > 0

    # A max_tokens and a stop string that land inside runs of accepted drafts.
    for cap in (1, 2, 5, 13):
        capped = SamplingParams(max_new_tokens=cap, temperature=0.0, ignore_eos=True)
        assert_same(outputs(plain, capped), outputs(spec, capped))
    for (_, text, _, _), prompt in zip(expected, PROMPTS, strict=True):
        assert isinstance(text, str) and len(text) > 8
        stop = SamplingParams(max_new_tokens=40, temperature=0.0, stop=[text[len(text) // 2 :][:3]])
        (want,) = plain.generate([prompt], stop)
        (got,) = spec.generate([prompt], stop)
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
        assert got.finish_reason is FinishReason.STOP_SEQUENCE

    # Every block back, in the target's cache and in the draft's.
    assert spec.core.scheduler.block_manager.num_used_blocks == 0
    assert drafter_of(spec).num_used_blocks == 0


def test_seeded_sampled_rows_draw_the_same_tokens(tiny_model_dir: Path, near_draft: Path) -> None:
    plain = LLM(str(tiny_model_dir), **OPTIONS)
    spec = LLM(str(tiny_model_dir), speculative=f"draft:{near_draft}", **OPTIONS)
    speculator = always_draft(spec)
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(
            max_new_tokens=24, temperature=0.8, top_k=3, seed=i, logprobs=True, ignore_eos=True
        )
        ((want,), (got,)) = plain.generate([prompt], params), spec.generate([prompt], params)
        assert got.token_ids == want.token_ids
    assert speculator.counters.num_accepted_tokens["draft"] > 0
    assert drafter_of(spec).num_used_blocks == 0


def test_sampled_outputs_follow_the_targets_distribution(
    tiny_model_dir: Path, near_draft: Path
) -> None:
    """3 tokens at temperature 1 and top-k 4 (64 outcomes), 2,000 times, the second and
    third drafted by the draft model (its argmax: a point-mass proposal, so keeping a
    draft while the target's own draw equals it is exact rejection sampling). Their joint
    counts against the exact distribution, from transformers."""
    llm = LLM(str(tiny_model_dir), speculative=f"draft:{near_draft}", **OPTIONS)
    spec = always_draft(llm, k=2, max_num_seqs=1 << 16)
    prompt = llm.tokenizer.encode("the cat sat on", add_special_tokens=False)
    expected, _ = three_token_distribution(tiny_model_dir, prompt)
    n = 2000
    counts = three_token_counts(llm, prompt, n)
    assert set(counts) <= set(expected)
    drafted = spec.counters.num_draft_tokens["draft"]
    accepted = spec.counters.num_accepted_tokens["draft"]
    # 2 drafts after the first token; a 3rd token left to make is drafted again.
    assert drafted >= 2 * n and 0.2 * drafted < accepted < 0.9 * drafted, (drafted, accepted)
    assert chi_square_p_value(counts, expected, n) > 0.001
    # The test can fail: accepting every draft would give the draft's argmax far too often.
    assert drafter_of(llm).num_used_blocks == 0


def test_a_draft_of_the_target_itself_accepts_everything(tiny_model_dir: Path) -> None:
    spec = LLM(str(tiny_model_dir), speculative=f"draft:{tiny_model_dir}", **OPTIONS)
    speculator = always_draft(spec, k=3)
    plain = LLM(str(tiny_model_dir), **OPTIONS)
    params = SamplingParams(max_new_tokens=21, temperature=0.0, ignore_eos=True)
    assert_same(outputs(plain, params), outputs(spec, params))
    counters = speculator.counters
    assert counters.num_accepted_tokens["draft"] == counters.num_draft_tokens["draft"] > 0
    # 1 token from the prompt's step, then 4 a step: 5 steps of drafts per request.
    assert counters.num_draft_tokens["draft"] == len(PROMPTS) * 5 * 3
    # A request asking for fewer drafts (OpenAI's "speculative.n_max") gets them: 1 a step
    # makes 2 tokens a step, 10 steps after the first token; 0 turns drafting off.
    for wanted, num_drafts in ((1, 10), (0, 0)):
        before = counters.num_draft_tokens["draft"]
        fewer = dataclasses.replace(params, num_speculative_tokens=wanted)
        assert_same(outputs(plain, params), outputs(spec, fewer))
        assert counters.num_draft_tokens["draft"] - before == len(PROMPTS) * num_drafts


def test_under_preemption_and_a_small_draft_cache(tiny_model_dir: Path, near_draft: Path) -> None:
    """A tight target cache preempts; the draft cache holds fewer tokens than the requests
    together, so shadows are evicted and caught up again."""
    prompts = [f"story {i}: " + "once upon a time " * (3 + i) for i in range(8)]
    params = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    options: dict[str, object] = {"dtype": "float32", "max_model_len": 384}
    ample = LLM(str(tiny_model_dir), num_kv_blocks=1024, **options).generate(prompts, params)
    tight = LLM(
        str(tiny_model_dir),
        num_kv_blocks=24,
        speculative=f"draft:{near_draft}",
        speculative_max_num_seqs=0,  # the smallest draft cache: one context
        **options,
    )
    speculator = always_draft(tight)
    starved = tight.generate(prompts, params)
    assert tight.core.counters.num_preemptions > 0
    assert drafter_of(tight).num_evictions > 0
    assert speculator.counters.num_accepted_tokens["draft"] > 0
    assert [c.token_ids for c in ample] == [c.token_ids for c in starved]
    assert tight.core.scheduler.block_manager.num_used_blocks == 0
    assert drafter_of(tight).num_used_blocks == 0


def test_rejected_drafts_slots_are_given_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A draft of other weights is rejected nearly always; after each step the target's
    table covers its computed tokens only, and so does the draft's (the slots of drafts the
    target rejected go back when the draft next syncs)."""
    other = write_tiny_model(tmp_path / "other", seed=7)
    llm = LLM(str(tiny_model_dir), speculative=f"draft:{other}", **OPTIONS)
    speculator = always_draft(llm, k=4)
    core, drafter = llm.core, drafter_of(llm)
    prompt = llm.tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    vocab = llm.parts.model_config.vocab_size
    core.add_request(build_request(llm.tokenizer, vocab, llm.parts.max_model_len, prompt, params))
    (request,) = core.scheduler.waiting
    size = core.scheduler.config.block_size
    while core.has_unfinished_requests():
        core.step()
        if request.is_finished:
            break
        assert len(request.block_ids) == -(-request.num_computed_tokens // size)
        shadow = drafter._shadows.get(request.request_id)
        if shadow is not None:
            assert len(shadow.block_ids) == -(-shadow.num_computed_tokens // size)
            assert drafter.num_used_blocks == len(shadow.block_ids)
            # It never runs ahead of the target by more than the drafts it computed.
            assert shadow.num_computed_tokens < request.num_tokens + 4
    counters = speculator.counters
    assert counters.num_draft_tokens["draft"] > 40
    assert counters.num_accepted_tokens["draft"] < counters.num_draft_tokens["draft"] // 2
    assert core.scheduler.block_manager.num_used_blocks == 0
    assert drafter.num_used_blocks == 0


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has one token more than the bundled one."""
    from tokenizers import AddedToken, Tokenizer

    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-other-tokenizer"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|draft_only|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_a_draft_with_another_tokenizer_is_refused(
    tiny_model_dir: Path, other_tokenizer_model: Path
) -> None:
    with pytest.raises(ModelLoadError, match="its tokenizer differs") as caught:
        LLM(str(tiny_model_dir), speculative=f"draft:{other_tokenizer_model}", **OPTIONS)
    message = str(caught.value)
    assert "\n" not in message and "<|draft_only|>" in message


@pytest.mark.slow
def test_serve_refuses_it_in_one_line(tiny_model_dir: Path, other_tokenizer_model: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rillet",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--speculative",
            f"draft:{other_tokenizer_model}",
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--engine-in-process",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("rillet serve:")]
    assert len(lines) == 1 and "its tokenizer differs" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    json.dumps(lines)  # plain text


@pytest.mark.slow
def test_bundled_model_drafting_for_itself() -> None:
    """The bundled model as its own draft: every proposal is the target's argmax, so
    nearly all are accepted, and the output is the plain run's."""
    plain = LLM(None, **OPTIONS)
    spec = LLM(None, speculative="draft:smollm2-135m", **OPTIONS)
    speculator = always_draft(spec)
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True, logprobs=True)
    assert_same(outputs(plain, params), outputs(spec, params))
    stops = SamplingParams(max_new_tokens=11, temperature=0.0, stop=[" the", "\n"])
    assert_same(outputs(plain, stops), outputs(spec, stops))
    counters = speculator.counters
    assert counters.num_accepted_tokens["draft"] > 0.9 * counters.num_draft_tokens["draft"] > 0
    assert spec.core.scheduler.block_manager.num_used_blocks == 0
    assert drafter_of(spec).num_used_blocks == 0
