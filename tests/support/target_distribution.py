"""The exact distribution of a tiny model's first three sampled tokens (temperature 1,
top-k 4: 64 outcomes), from transformers, and Pearson's chi-square test of observed counts
against it: the statistical tests that speculation keeps the target's distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

Outcome = tuple[int, int, int]


def three_token_distribution(
    model_dir: Path, prompt: list[int]
) -> tuple[dict[Outcome, float], dict[int, list[int]]]:
    """P(t1, t2, t3) under temperature 1 and top-k 4, and per first token the two most
    likely tokens after it (what a drafter that agrees with the target's argmax drafts)."""
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)

    def top4(ids: list[int]) -> dict[int, float]:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        values, tokens = logits.topk(4)
        return dict(zip(tokens.tolist(), values.softmax(0).tolist(), strict=True))

    expected: dict[Outcome, float] = {}
    table: dict[int, list[int]] = {}
    for t1, p1 in top4(prompt).items():
        second = top4([*prompt, t1])
        best2 = max(second, key=second.__getitem__)
        for t2, p2 in second.items():
            third = top4([*prompt, t1, t2])
            if t2 == best2:
                table[t1] = [t2, max(third, key=third.__getitem__)]
            for t3, p3 in third.items():
                expected[(t1, t2, t3)] = p1 * p2 * p3
    return expected, table


def chi_square_p_value(counts: dict[Outcome, int], expected: dict[Outcome, float], n: int) -> float:
    """Pearson's chi-square over the outcomes expected at least 5 times, the rest pooled."""
    big = [k for k, p in expected.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    means = [expected[k] * n for k in big] + [n * (1 - sum(expected[k] for k in big))]
    if means[-1] < 5:
        observed[-2] += observed.pop()
        means[-2] += means.pop()
    statistic = sum((o - m) ** 2 / m for o, m in zip(observed, means, strict=True))
    df = len(means) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(statistic / 2)))


def three_token_counts(llm: Any, prompt: list[int], n: int) -> dict[Outcome, int]:
    """How often each first three tokens came out of ``n`` samples of ``prompt`` at
    temperature 1, top-k 4 (a 4th token leaves room for 2 drafts after the first; it is
    not counted)."""
    from rillet import SamplingParams

    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=4, ignore_eos=True)
    counts: dict[Outcome, int] = {}
    for c in llm.generate([prompt] * n, params):
        key = (c.token_ids[0], c.token_ids[1], c.token_ids[2])
        counts[key] = counts.get(key, 0) + 1
    return counts
