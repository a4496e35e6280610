"""Speculative decoding on real models: greedy output identical with and without it, a
seeded sampled output identical too, and unseeded sampled outputs distributed as the
target's (a chi-square test against the exact distribution from transformers).

float32, where a row's result does not depend on the batch's shape, so a verify row's
positions (decode rows of one sequence) pick what one-token decodes would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rillet import LLM, SamplingParams
from rillet.engine.request import Request
from rillet.engine.speculation import SpeculationConfig, Speculator
from target_distribution import chi_square_p_value, three_token_counts, three_token_distribution

#: Prompts whose continuations repeat what came before, so prompt lookup finds drafts.
PROMPTS = [
    "1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "the cat sat on the mat. the cat sat on the mat. the cat",
    "Hi",
    "Copy this line exactly: red green blue red green blue red green blue",
]


def run(llm: LLM, params: SamplingParams | list[SamplingParams]) -> list[tuple[object, ...]]:
    return [
        (c.token_ids, c.text, c.finish_reason, [t.logprob for t in c.tokens])
        for c in llm.generate(PROMPTS, params)
    ]


def assert_same(plain: list[tuple[object, ...]], spec: list[tuple[object, ...]]) -> None:
    for (ids_a, text_a, reason_a, lp_a), (ids_b, text_b, reason_b, lp_b) in zip(
        plain, spec, strict=True
    ):
        assert (ids_a, text_a, reason_a) == (ids_b, text_b, reason_b)
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


class KnownContinuation(Speculator):
    """Drafts the plain run's output for each prompt, one token wrong in every third run, so
    a random model (whose output never repeats, so prompt lookup finds nothing) still
    exercises acceptance, rejection and the bonus token."""

    def __init__(self, outputs: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(SpeculationConfig("ngram", 4, max_num_seqs=8, judge_by_rates=False))
        self.outputs = outputs
        self.num_calls = 0

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        self.num_calls += 1
        known = self.outputs[tuple(request.prompt_token_ids)]
        n = request.num_output_tokens
        drafts = known[n : n + min(4, max_tokens)]
        if drafts and self.num_calls % 3 == 0:
            drafts[self.num_calls % len(drafts)] = 0
        return drafts


def check_engine(plain: LLM, spec: LLM) -> None:
    speculator = spec.core.scheduler.speculator
    assert speculator is not None
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    expected = run(plain, params)
    assert_same(expected, run(spec, params))
    assert speculator.counters.num_accepted_tokens["ngram"] > 20

    # A max_tokens and a stop string that land inside runs of accepted drafts.
    stops = []
    for _, text, _, _ in expected:
        assert isinstance(text, str)
        stop = text[len(text) // 2 : len(text) // 2 + 3] if len(text) > 8 else "zzz"
        stops.append(SamplingParams(max_new_tokens=13, temperature=0.0, stop=[stop]))
    assert_same(run(plain, stops), run(spec, stops))

    # Seeded sampled rows speculate, and draw the very tokens they would without.
    drafted = speculator.counters.num_draft_tokens["ngram"]
    sampled = [
        SamplingParams(max_new_tokens=24, temperature=0.8, seed=i, logprobs=True, ignore_eos=True)
        for i in range(len(PROMPTS))
    ]
    assert_same(run(plain, sampled), run(spec, sampled))
    assert speculator.counters.num_draft_tokens["ngram"] > drafted
    assert spec.core.scheduler.block_manager.num_used_blocks == 0


OPTIONS: dict[str, object] = {"dtype": "float32", "seed": 0, "num_kv_blocks": 512}


def test_tiny_model_greedy_output_is_unchanged(tiny_model_dir: Path) -> None:
    plain = LLM(str(tiny_model_dir), **OPTIONS)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    outputs = {tuple(c.prompt_token_ids): c.token_ids for c in plain.generate(PROMPTS, params)}
    spec = LLM(str(tiny_model_dir), **OPTIONS)
    spec.core.scheduler.speculator = KnownContinuation(outputs)
    check_engine(plain, spec)


def test_tiny_model_under_preemption(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    prompts = [f"story {i}: " + "once upon a time " * (3 + i) for i in range(8)]
    options: dict[str, object] = {"dtype": "float32", "max_model_len": 384}
    plain = LLM(str(tiny_model_dir), num_kv_blocks=1024, **options)
    ample = plain.generate(prompts, params)
    tight = LLM(str(tiny_model_dir), num_kv_blocks=24, **options)
    known = KnownContinuation({tuple(c.prompt_token_ids): c.token_ids for c in ample})
    tight.core.scheduler.speculator = known
    starved = tight.generate(prompts, params)
    assert tight.core.counters.num_preemptions > 0
    assert known.counters.num_accepted_tokens["ngram"] > 0
    assert [c.token_ids for c in ample] == [c.token_ids for c in starved]
    assert tight.core.scheduler.block_manager.num_used_blocks == 0


def test_bundled_model_with_prompt_lookup() -> None:
    plain = LLM(None, **OPTIONS)
    spec = LLM(None, speculative="ngram", speculative_max_num_seqs=8, **OPTIONS)
    # The rate gate judges by the clock; this test needs drafts whatever it says.
    built = spec.core.scheduler.speculator
    assert built is not None and built.config.judge_by_rates
    unjudged = dataclasses.replace(built.config, judge_by_rates=False)
    spec.core.scheduler.speculator = Speculator(unjudged)
    check_engine(plain, spec)


class TableDrafts(Speculator):
    """Drafts looked up by the request's first output token (the drafts' positions follow
    it), so every verified position has both accepted and rejected drafts."""

    def __init__(self, table: dict[int, list[int]]) -> None:
        config = SpeculationConfig(
            "ngram", 2, max_num_seqs=1 << 16, max_step_rows=1 << 16, judge_by_rates=False
        )
        super().__init__(config)
        self.table = table

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        if request.num_output_tokens != 1:
            return []
        return self.table[request.output_token_ids[0]][:max_tokens]


def test_sampled_outputs_follow_the_targets_distribution(tiny_model_dir: Path) -> None:
    """3 tokens at temperature 1 and top-k 4 (64 outcomes), 4,000 times under speculation:
    the second and third come from verified positions (drafted: the most likely token
    there). Their joint counts against the exact distribution, from transformers."""
    llm = LLM(str(tiny_model_dir), **OPTIONS)
    prompt = llm.tokenizer.encode("the cat sat on", add_special_tokens=False)
    expected, table = three_token_distribution(tiny_model_dir, prompt)

    spec = TableDrafts(table)
    llm.core.scheduler.speculator = spec
    n = 4000
    counts = three_token_counts(llm, prompt, n)
    assert set(counts) <= set(expected)
    drafted = spec.counters.num_draft_tokens["ngram"]
    accepted = spec.counters.num_accepted_tokens["ngram"]
    assert drafted == 2 * n and 0.2 * drafted < accepted < 0.9 * drafted

    p_value = chi_square_p_value(counts, expected, n)
    assert p_value > 0.001, p_value
    # The test can fail: accepting every draft gives the drafted outcomes far too often.
    drafted_share = sum(counts.get((t1, *d), 0) for t1, d in table.items()) / n
    assert drafted_share < 0.9
