"""Speculative decoding in the scheduler: the n-gram proposer, the policy, and verification.

No torch: ``test_scheduler.FakeModel`` scores every position of a speculative row (its
"model" is a pure function of the context), and it checks every position a row attends to
holds the right token, so a rejected draft's KV that leaked into a block table or into the
prefix cache fails the run.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from rillet.engine.request import Request
from rillet.engine.scheduler import Scheduler, SchedulerConfig
from rillet.engine.speculation import NgramIndex, SpeculationConfig, Speculator
from rillet.protocol import FinishReason
from scheduler_model import (
    FakeModel,
    check_invariants,
    expected_tokens,
    make_request,
    next_token,
    step,
)


def test_ngram_index_proposes_what_followed_the_latest_longest_match() -> None:
    index = NgramIndex(min_n=2, max_n=3)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3]
    # (1, 2, 3) last occurred at the start: 4, 5 followed it. The shorter (2, 3) occurred
    # later (7 followed), but the longer match wins.
    assert index.propose(tokens, 2) == [4, 5]
    tokens += [8]  # (3, 8) and (2, 3, 8) are new
    assert index.propose(tokens, 4) == []
    tokens += [1, 2]  # (8, 1, 2) is new; (1, 2) last occurred at 9..10, then 3 and 8
    assert index.propose(tokens, 4) == [3, 8, 1, 2]
    assert NgramIndex(2, 3).propose([5, 5, 5], 3) == [5]  # up to the known end


class OracleSpeculator(Speculator):
    """Proposes the fake model's true continuation, with one token wrong now and then."""

    def __init__(self, config: SpeculationConfig, seed: int, wrong: float = 0.3) -> None:
        super().__init__(config)
        self.rng = random.Random(seed)
        self.wrong = wrong

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        k = min(self.config.num_speculative_tokens, max_tokens)
        seq = list(request.all_token_ids)
        drafts = []
        for _ in range(max(0, k)):
            seq.append(next_token(seq))
            drafts.append(seq[-1])
        if drafts and self.rng.random() < self.wrong:
            drafts[self.rng.randrange(len(drafts))] = 7  # never a fake model token
        return drafts


def spec_config(**overrides: object) -> SpeculationConfig:
    values: dict[str, object] = {"method": "ngram", "num_speculative_tokens": 3, **overrides}
    return SpeculationConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_output_is_the_models_whatever_the_drafts(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    # A tight cache: speculation must fit around preemptions and never cause one.
    cfg = SchedulerConfig(
        max_num_seqs=6,
        max_num_batched_tokens=24,
        max_model_len=64,
        block_size=4,
        num_blocks=24,
        enable_prefix_caching=prefix_caching,
    )
    spec = OracleSpeculator(spec_config(max_num_seqs=6), seed)
    sched, model = Scheduler(cfg, eos_token_ids=frozenset({1500}), speculator=spec), FakeModel(cfg)
    shared = [rng.randrange(1, 50) for _ in range(8)]  # prefix-cache hits between requests
    requests = []
    for i in range(14):
        prompt = shared + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
        requests.append(make_request(f"r{i}", prompt, max_new_tokens=rng.randrange(1, 30)))
    for r in requests:
        sched.add_request(r)
    num_speculative_rows = 0
    while sched.has_unfinished_requests():
        output, _ = step(sched, model)
        num_speculative_rows += sum(bool(s.draft_token_ids) for s in output.scheduled)
    assert num_speculative_rows > 10
    for r in requests:
        want = expected_tokens(r.prompt_token_ids, r.max_new_tokens)
        if 1500 in want:  # the EOS id ends it early
            want = want[: want.index(1500) + 1]
        assert r.output_token_ids == want, r.request_id
        assert len(r.output_token_ids) <= r.max_new_tokens
    assert sched.block_manager.num_used_blocks == 0
    counters = spec.counters
    assert 0 < counters.num_accepted_tokens["ngram"] < counters.num_draft_tokens["ngram"]


def test_max_tokens_and_stop_ids_inside_an_accepted_run() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=16
    )
    prompt = [3, 1, 4, 1, 5]
    want = expected_tokens(prompt, 10)
    for cap in (1, 2, 3, 5, 6):
        sched = Scheduler(cfg, speculator=OracleSpeculator(spec_config(), 0, wrong=0.0))
        r = make_request("a", prompt, max_new_tokens=cap)
        sched.add_request(r)
        model = FakeModel(cfg)
        while sched.has_unfinished_requests():
            output = sched.schedule()
            # Drafts never reach past the cap: the row's last token is the cap's.
            for s in output.scheduled:
                assert s.request.num_output_tokens + 1 + len(s.draft_token_ids) <= cap
            sched.update_from_output(output, model.run(output))
        assert r.output_token_ids == want[:cap] and r.finish_reason is FinishReason.LENGTH
    # A stop id the model emits in the middle of accepted drafts ends the run there.
    sched = Scheduler(cfg, speculator=OracleSpeculator(spec_config(), 0, wrong=0.0))
    r = make_request("b", prompt, max_new_tokens=10, stop_token_ids=[want[3]])
    sched.add_request(r)
    model = FakeModel(cfg)
    steps = []
    while sched.has_unfinished_requests():
        _, updated = step(sched, model)
        steps.append([u.num_step_tokens for u in updated])
    assert r.output_token_ids == want[:4] and r.finish_reason is FinishReason.STOP_SEQUENCE
    assert steps == [[1], [3]]  # the prompt's token, then 3 of a 4-token run
    assert sched.block_manager.num_used_blocks == 0


def test_rejected_slots_are_given_back() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=16
    )
    spec = OracleSpeculator(spec_config(num_speculative_tokens=8), 0, wrong=0.0)
    sched, model = Scheduler(cfg, speculator=spec), FakeModel(cfg)
    r = make_request("a", [1, 2, 3, 4], max_new_tokens=30)
    sched.add_request(r)
    step(sched, model)  # prefill: 4 tokens, 1 block, one output token
    spec.wrong = 1.0  # every run now has a wrong token
    spec.rng = random.Random(1)
    for _ in range(5):
        output, _ = step(sched, model)
        (row,) = output.scheduled
        # The table covers exactly the computed tokens: no block of rejected slots is kept.
        assert len(r.block_ids) == -(-r.num_computed_tokens // cfg.block_size)
        assert r.num_computed_tokens == r.num_tokens - 1
        check_invariants(sched)
        assert row.draft_token_ids


def test_policy_batch_size_and_low_acceptance() -> None:
    spec = Speculator(spec_config(max_num_seqs=2, cooldown_steps=3, row_cost=0.1))
    assert spec.step_allows(2) and not spec.step_allows(3)
    assert spec.step_allows(1)
    r = make_request("a", [1, 2, 3, 1, 2], temperature=0.0)
    assert spec.propose(r, 8) == [3, 1, 2]
    sampled = make_request("s", [1, 2, 3, 1, 2], temperature=0.7)
    penalised = make_request("p", [1, 2, 3, 1, 2], temperature=0.0, repetition_penalty=1.2)
    assert spec.propose(sampled, 8) == [3, 1, 2] and spec.propose(penalised, 8) == []
    for _ in range(6):
        spec.observe("a", 3, 0)
    # Acceptance fell under the row cost: no drafts while cooling down, then a probe of one.
    assert [spec.propose(r, 8) for _ in range(4)] == [[], [], [3], []]


def test_policy_drafts_only_what_pays_at_the_batch_size() -> None:
    """Draft i pays when acceptance^i > row_cost * batch; a step's rows stay bounded."""
    spec = Speculator(spec_config(num_speculative_tokens=8, row_cost=0.05, max_step_rows=12))
    assert spec.step_allows(1)
    assert spec.num_worth_proposing(0.5, 8) == 4  # 0.5^4 = 0.0625 > 0.05 > 0.5^5
    assert spec.num_worth_proposing(0.9, 8) == 8
    assert spec.step_allows(4)  # threshold 0.2
    assert spec.num_worth_proposing(0.5, 8) == 2
    assert spec.num_worth_proposing(0.15, 8) == 0
    # 4 decode rows + drafts <= 12 rows: the budget runs out across requests.
    rows = [make_request(f"r{i}", [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2]) for i in range(4)]
    drafted = [len(spec.propose(r, 8)) for r in rows]
    assert drafted == [6, 2, 0, 0]  # the match has 6 tokens after it; 2 rows were left
    assert not spec.step_allows(12)  # the batch alone fills the step
    assert not Speculator(SpeculationConfig()).step_allows(1)  # "off"


def test_a_request_may_ask_for_fewer_drafts() -> None:
    """``SamplingParams.num_speculative_tokens`` caps a request's drafts under the server's."""
    spec = Speculator(spec_config(num_speculative_tokens=4, row_cost=0.0, row_cost_per_1k=0.0))
    assert spec.step_allows(1)
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert spec.propose(make_request("a", tokens, temperature=0.0), 8) == [3, 4, 5, 6]
    capped = make_request("b", tokens, temperature=0.0, num_speculative_tokens=2)
    assert spec.propose(capped, 8) == [3, 4]
    above = make_request("c", tokens, temperature=0.0, num_speculative_tokens=9)
    assert spec.propose(above, 8) == [3, 4, 5, 6]  # the server's bound holds
    none = make_request("d", tokens, temperature=0.0, num_speculative_tokens=0)
    assert spec.propose(none, 8) == []
    assert spec.num_to_draft(capped, 8) == 2 and spec.num_to_draft(none, 8) == 0


def test_a_draft_model_pays_for_its_forwards() -> None:
    """With a draft model, draft i pays when a^i > (row_cost(n) + draft_cost) * B."""
    cfg = spec_config(
        method="draft:tiny", num_speculative_tokens=8, row_cost=0.1, row_cost_per_1k=0.05
    )
    spec = Speculator(dataclasses.replace(cfg, draft_cost=0.4))
    assert spec.drafts_in_runner and spec.step_allows(1)
    assert spec.config.row_cost_at(2000) + spec.draft_cost == pytest.approx(0.6)
    assert spec.num_worth_proposing(0.8, 8, context_len=0) == 3  # 0.512 > 0.5 > 0.41
    assert spec.num_worth_proposing(0.8, 8, context_len=2000) == 2  # 0.64 > 0.6 > 0.512
    assert spec.num_worth_proposing(0.45, 8) == 0  # a draft model that rarely agrees: never
    assert spec.step_allows(2) and spec.num_worth_proposing(0.8, 8) == 0  # 0.8 < 0.5 * 2
    # Without the draft model's forwards the same acceptance pays more drafts.
    without = Speculator(cfg)
    assert without.step_allows(1) and without.num_worth_proposing(0.8, 8) == 8
    assert spec.step_allows(1)
    r = make_request("a", list(range(10)), temperature=0.0)
    assert spec.num_to_draft(r, 8) == 3  # the prior acceptance, 0.8, at 10 tokens
    assert spec.counters.num_draft_tokens == {"draft": 0}
    # Measured: draft forwards of 30 ms against a 60 ms verification of 2 drafts at no
    # context (a 50 ms decode step): the cost moves from 0.4 toward 0.6, and stays there.
    for _ in range(8):  # a fresh start's first forwards are slow: ignored
        spec.observe_draft_forwards(0.500, 0.060, 2, 0)
    assert spec.draft_cost == 0.4
    for _ in range(40):
        spec.observe_draft_forwards(0.030, 0.060, 2, 0)
    assert spec.draft_cost == pytest.approx(0.6, abs=1e-3)
    assert spec.num_worth_proposing(0.8, 8) == 1  # 0.8 > 0.7 > 0.64
    # A draft model slower than the target step it saves: the rule never drafts.
    for _ in range(40):
        spec.observe_draft_forwards(0.060, 0.060, 2, 0)
    assert spec.num_worth_proposing(0.95, 8) == 0
