"""Sampler: batched tensor ops checked against plain single-row references."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from rillet.engine.sampler import (
    Sampler,
    SamplingRow,
    filter_logits,
    penalized_logits,
)
from rillet.sampling import SamplingParams

V = 64


def _logits(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3.0


def _row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    suppress: tuple[int, ...] = (),
) -> SamplingRow:
    params = params or SamplingParams()
    return SamplingRow(
        params=params,
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=Sampler.make_generator(params.seed, "cpu"),
        suppress_token_ids=suppress,
    )


# ---- single-row references, written for clarity, not speed ----


def _ref_penalties(
    logits: list[float], p: SamplingParams, prompt: list[int], out: list[int]
) -> list[float]:
    x = list(logits)
    for t in set(prompt) | set(out):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(out).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def _probs(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in x]
    s = sum(e)
    return [v / s for v in e]


def _ref_kept(logits: list[float], p: SamplingParams) -> set[int]:
    x = [v / p.temperature for v in logits]
    keep = set(range(len(x)))

    def restrict(allowed: set[int]) -> None:
        nonlocal x
        keep.intersection_update(allowed)
        x = [v if i in keep else -math.inf for i, v in enumerate(x)]

    if p.top_k > 0:
        restrict(set(sorted(range(len(x)), key=lambda i: -x[i])[: p.top_k]))
    if p.top_p < 1.0:
        probs, mass, allowed = _probs(x), 0.0, set()
        for i in sorted(range(len(x)), key=lambda i: -x[i]):
            if mass >= p.top_p:
                break
            allowed.add(i)
            mass += probs[i]
        restrict(allowed)
    if p.typical_p < 1.0:
        probs = _probs(x)
        ent = -sum(q * math.log(q) for q in probs if q > 0)
        dist = {i: abs(-math.log(probs[i]) - ent) for i in keep}
        mass, allowed = 0.0, set()
        for i in sorted(keep, key=lambda i: dist[i]):
            allowed.add(i)
            mass += probs[i]
            if mass >= p.typical_p:
                break
        restrict(allowed)
    if p.min_p > 0.0:
        probs = _probs(x)
        restrict({i for i in keep if probs[i] >= p.min_p * max(probs)})
    return keep


# ---- tests ----


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = _logits(6, seed=1)
    logits[2, 5] = logits[2, 9] = logits[2].max() + 1.0
    out = Sampler(seed=0)(logits, [_row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.token_ids[2] == 5
    assert out.logprobs is None and out.top_logprobs is None


def test_tiny_temperature_is_greedy_and_huge_one_stays_finite() -> None:
    logits = _logits(2, seed=2)
    logits[1, :10] = -math.inf
    rows = [_row(SamplingParams(temperature=1e-9)), _row(SamplingParams(temperature=1e300))]
    sampler = Sampler(seed=0)
    for _ in range(20):
        ids = sampler(logits, rows).token_ids
        assert ids[0] == int(logits[0].argmax())
        assert ids[1] >= 10


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.4),
    ],
)
def test_penalties_match_reference(params: SamplingParams) -> None:
    logits = _logits(3, seed=3)
    prompt, out = [1, 2, 2, 7, 40], [7, 7, 7, 3, 40, 63]
    rows = [_row(params, prompt, out), _row(SamplingParams(), prompt, out), _row(params, [], [])]
    got = penalized_logits(logits, rows)
    expected = _ref_penalties(logits[0].tolist(), params, prompt, out)
    torch.testing.assert_close(got[0], torch.tensor(expected))
    torch.testing.assert_close(got[1], logits[1])  # default params: untouched
    torch.testing.assert_close(got[2], logits[2])  # nothing seen yet: untouched
    assert not torch.equal(got[0], logits[0])


def test_out_of_range_ids_are_ignored() -> None:
    logits = _logits(1, seed=4)
    row = _row(SamplingParams(repetition_penalty=2.0), [V + 5], [-1, V], suppress=(V, 10**9))
    torch.testing.assert_close(penalized_logits(logits, [row]), logits)


def test_suppression_is_honored_for_greedy_and_sampled() -> None:
    logits = _logits(2, seed=5)
    top = logits.argmax(dim=1).tolist()
    rows = [
        _row(SamplingParams(temperature=0.0), suppress=(top[0],)),
        _row(SamplingParams(temperature=0.5, seed=1), suppress=tuple(range(0, V, 2))),
    ]
    sampler = Sampler(seed=0)
    for _ in range(50):
        ids = sampler(logits, rows).token_ids
        assert ids[0] != top[0]
        assert ids[1] % 2 == 1


def test_suppressing_everything_falls_back_instead_of_nan() -> None:
    logits = _logits(2, seed=6)
    logits[:, 0] = -50.0  # so an argmax over an all -inf row (index 0) would be caught
    rows = [
        _row(SamplingParams(temperature=0.0), suppress=tuple(range(V))),
        _row(SamplingParams(temperature=1.0, top_k=1, seed=3), suppress=tuple(range(V))),
    ]
    assert torch.equal(penalized_logits(logits, rows), logits)
    expected = logits.argmax(dim=1).tolist()
    assert Sampler(seed=0)(logits, rows).token_ids == expected


FILTER_PARAMS = [
    SamplingParams(top_k=5),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.6),
    SamplingParams(top_p=0.05),
    SamplingParams(typical_p=0.5),
    SamplingParams(typical_p=0.9, temperature=1.5),
    SamplingParams(min_p=0.1),
    SamplingParams(min_p=1.0),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=30, top_p=0.9, typical_p=0.8, min_p=0.02),
    SamplingParams(),
]


def test_filters_keep_exactly_the_reference_sets() -> None:
    logits = _logits(len(FILTER_PARAMS), seed=7)
    filtered = filter_logits(logits, FILTER_PARAMS)  # all in one batch: rows must not interfere
    for i, params in enumerate(FILTER_PARAMS):
        kept = set(torch.nonzero(torch.isfinite(filtered[i])).flatten().tolist())
        assert kept == _ref_kept(logits[i].tolist(), params), params
        assert kept  # never an empty row
    assert torch.isfinite(filtered[-1]).all()


def test_default_filters_keep_a_negligible_tail() -> None:
    # The cumsum of a peaked distribution reaches 1.0 in float32 long before its tail ends;
    # rows with top_p / typical_p == 1 must still keep every token.
    logits = torch.zeros(3, V)
    logits[:, 0] = 60.0
    params = [SamplingParams(), SamplingParams(top_p=0.5), SamplingParams(typical_p=0.99)]
    filtered = filter_logits(logits, params)
    assert torch.isfinite(filtered[0]).all()
    assert torch.isfinite(filtered[1]).sum() == 1


def test_wide_nucleus_over_a_larger_vocabulary_matches_reference() -> None:
    logits = _logits(3, seed=13, vocab=1000)
    logits[0] *= 0.1
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.9), SamplingParams(top_p=0.999)]
    filtered = filter_logits(logits, params)
    for i, p in enumerate(params):
        kept = set(torch.nonzero(torch.isfinite(filtered[i])).flatten().tolist())
        assert kept == _ref_kept(logits[i].tolist(), p)
    assert torch.isfinite(filtered[0]).sum() > 256


def test_samples_only_come_from_the_kept_set() -> None:
    params = [SamplingParams(top_k=4, seed=11), SamplingParams(top_p=0.5, min_p=0.05, seed=12)]
    logits = _logits(2, seed=8, vocab=16) / 3.0  # flat enough that many tokens are plausible
    rows = [_row(p) for p in params]
    sampler = Sampler(seed=0)
    seen: list[set[int]] = [set(), set()]
    for _ in range(400):
        for i, t in enumerate(sampler(logits, rows).token_ids):
            seen[i].add(t)
    for i, p in enumerate(params):
        assert seen[i] == _ref_kept(logits[i].tolist(), p)


def _draws(
    sampler: Sampler, rows: list[SamplingRow], logits: list[torch.Tensor], pos: int
) -> list[int]:
    return [sampler(step_logits, rows).token_ids[pos] for step_logits in logits]


def test_seeded_row_is_batch_invariant() -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    steps = [_logits(1, seed=100 + s)[0] for s in range(20)]
    alone = _draws(Sampler(seed=1), [_row(params)], [x.unsqueeze(0) for x in steps], 0)

    for batch, pos, sampler_seed in [(4, 0, 2), (16, 7, 3), (9, 8, 4)]:
        others = [
            _row(SamplingParams(temperature=t, seed=s, min_p=0.05))
            for t, s in zip(
                torch.linspace(0.0, 1.5, batch - 1).tolist(), range(batch - 1), strict=True
            )
        ]
        others[1] = _row(SamplingParams(temperature=1.0))  # an unseeded neighbour too
        rows = [*others[:pos], _row(params), *others[pos:]]
        step_logits = []
        for s, x in enumerate(steps):
            noise = _logits(batch, seed=1000 * batch + s)
            noise[pos] = x
            step_logits.append(noise)
        assert _draws(Sampler(seed=sampler_seed), rows, step_logits, pos) == alone


def test_different_seeds_differ_and_same_seed_repeats() -> None:
    logits = _logits(1, seed=9) / 3.0
    sampler = Sampler(seed=0)

    def sequence(seed: int) -> list[int]:
        row = _row(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits, [row]).token_ids[0] for _ in range(20)]

    assert sequence(1) == sequence(1)
    assert sequence(1) != sequence(2)
    assert Sampler.make_generator(None, "cpu") is None
    assert Sampler.make_generator(2**64 - 1, "cpu") is not None


def test_logprobs_are_raw_and_top_logprobs_sorted() -> None:
    logits = _logits(4, seed=10).to(torch.bfloat16)
    rows = [
        _row(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)),
        _row(SamplingParams(temperature=0.8, seed=5, repetition_penalty=1.5), [1, 2], [3]),
        _row(SamplingParams(temperature=1.0, seed=6, logprobs=True, top_logprobs=20)),
        _row(SamplingParams(temperature=0.0, top_logprobs=1, presence_penalty=2.0), [], [4]),
    ]
    out = Sampler(seed=0)(logits, rows)
    raw = torch.log_softmax(logits.float(), dim=1)
    assert out.logprobs is not None and out.top_logprobs is not None
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, t].item(), abs=1e-5)
    assert out.top_logprobs[1] == []  # did not ask, while others did
    for i, n in [(0, 3), (2, 20), (3, 1)]:
        top = out.top_logprobs[i]
        assert len(top) == n
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(n).values.tolist()
        assert values == pytest.approx(expected, abs=1e-5)
        for t in top:
            assert t.logprob == pytest.approx(raw[i, t.token_id].item(), abs=1e-5)
    assert out.top_logprobs[0][0].token_id == out.token_ids[0]

    only = Sampler(seed=0)(logits[:1], [_row(SamplingParams(temperature=0.0, logprobs=True))])
    assert only.top_logprobs is None and only.logprobs == pytest.approx([raw[0].max().item()])


def test_prompt_logprobs() -> None:
    logits = _logits(5, seed=11)
    ids = [3, 17, 17, 0, 63]
    sampler = Sampler(seed=0)
    got = sampler.prompt_logprobs(logits, ids)
    raw = torch.log_softmax(logits, dim=1)
    assert len(got) == 5 and got[0] is None
    for i in range(1, 5):
        assert got[i] == pytest.approx(raw[i - 1, ids[i]].item(), abs=1e-5)
    assert sampler.prompt_logprobs(logits[:4], ids) == got
    assert sampler.prompt_logprobs(logits[:0], []) == []
    assert sampler.prompt_logprobs(logits[:1], [5]) == [None]
    with pytest.raises(ValueError):
        sampler.prompt_logprobs_for(logits[:2], [1, 2, 3])


def test_mixed_batch_of_greedy_and_sampled_rows() -> None:
    logits = _logits(6, seed=12)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1, seed=1),  # sampled but forced to argmax
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, min_p=0.2, seed=2),
    ]
    rows = [_row(p, [0, 1, 2], [int(logits[2].argmax())]) for p in params]
    out = Sampler(seed=0)(logits, rows)
    processed = penalized_logits(logits, rows)
    for i in (0, 1, 2, 4):
        assert out.token_ids[i] == int(processed[i].argmax())
    assert out.token_ids[2] != int(logits[2].argmax()) or logits[2].max() <= 0
    assert out.token_ids[3] in logits[3].topk(3).indices.tolist()
    assert out.token_ids[5] in _ref_kept(logits[5].tolist(), params[5])


@pytest.mark.parametrize("seed", [None, 77])
def test_sampling_frequencies_match_the_distribution(seed: int | None) -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().unsqueeze(0)
    row = _row(SamplingParams(temperature=1.0, seed=seed))
    sampler = Sampler(seed=2024)
    n = 4000
    counts = Counter(sampler(logits, [row]).token_ids[0] for _ in range(n))
    chi2 = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs.tolist()))
    # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5, and the seeds make this deterministic anyway.
    assert chi2 < 25.0
    assert set(counts) == set(range(5))


def test_runs_under_inference_mode_on_half_precision_logits() -> None:
    params = SamplingParams(temperature=0.9, top_p=0.8, typical_p=0.9, min_p=0.01, seed=4)
    logits = _logits(3, seed=14).to(torch.bfloat16)
    rows = [_row(params, [1, 2], [3]), _row(SamplingParams(temperature=0.0)), _row(params)]
    with torch.inference_mode():
        out = Sampler(seed=0)(logits, rows)
    assert out.token_ids[1] == int(logits[1].argmax())
    kept = _ref_kept(logits[2].float().tolist(), params)
    assert out.token_ids[2] in kept
    assert out.logprobs is None and out.top_logprobs is None
