"""What a draft model costs against its target, in the engine: the draft-model forward's
time as a fraction of the target's decode step (the speculation policy's ``draft_cost``),
and the acceptance, on chat prompts at c = 1.

Runs the target with ``--speculative draft:NAME`` in this process, each prompt alone
(``--max-tokens`` greedy tokens), and reports the draft model's decode-like forward time,
the policy's measured ``draft_cost`` (its moving average) against the weight-bytes prior,
the drafts proposed and accepted, and the decode rate without speculation on the same
prompts (same process, same weights: alternating, so drift hits both).

    PYTHONPATH=src .venv/bin/python bench/draft_cost.py
    PYTHONPATH=src .venv/bin/python bench/draft_cost.py --model qwen2.5-coder-1.5b \\
        --draft qwen2.5-coder-0.5b --max-tokens 96
    PYTHONPATH=src .venv/bin/python bench/draft_cost.py --prompts workload

``--prompts workload`` takes the first three of ``rillet bench``'s chat prompts (what
``bench/speculative.py --workload chat`` sends) instead of the three coding questions here.
``gate`` says how the rate gate (``engine/spec_rates.py``) judged the steps: allowed to
draft, kept plain, probes, and the measured ratio of tokens a second drafting/plain at c = 1.
``policy`` counts the verifications by how many drafts the policy gave them, with the drafts
accepted at each count, so what the policy decided is seen beside what it cost.
"""

from __future__ import annotations

import argparse
import json
import time

from rillet import LLM, SamplingParams
from rillet.benchmark.workload import PROMPTS as WORKLOAD_PROMPTS
from rillet.engine.draft_model import DraftModelProposer

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring.",
    "Explain the difference between a list and a tuple in Python, with a short example.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompts", choices=("coding", "workload"), default="coding")
    args = parser.parse_args()
    llm = LLM(args.model, speculative=f"draft:{args.draft}")
    core = llm.core
    spec = core.scheduler.speculator
    drafter = core.runner.drafter
    assert spec is not None and isinstance(drafter, DraftModelProposer)
    prior = spec.draft_cost
    # Each verification's (drafts, accepted), through the policy's own hook.
    verifications: list[tuple[int, int]] = []
    observe = spec.observe

    def recording(request_id: str, num_drafts: int, num_accepted: int) -> None:
        verifications.append((num_drafts, num_accepted))
        observe(request_id, num_drafts, num_accepted)

    spec.observe = recording  # type: ignore[method-assign]
    prompts = PROMPTS if args.prompts == "coding" else list(WORKLOAD_PROMPTS[:3])
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    chats = [
        llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
            add_special_tokens=False,
        )
        for p in prompts
    ]
    # Untimed: the first forwards fault the mapped weights in (3-5x slower).
    llm.generate([chats[0]], SamplingParams(max_new_tokens=16, temperature=0.0))
    rates: dict[str, list[float]] = {"off": [], "draft": []}
    for prompt in chats:
        for mode in ("off", "draft"):
            core.scheduler.speculator = spec if mode == "draft" else None
            started = time.perf_counter()
            (out,) = llm.generate([prompt], params)
            rates[mode].append(len(out.token_ids) / (time.perf_counter() - started))
    policy: dict[int, list[int]] = {}
    for num_drafts, num_accepted in verifications:
        count = policy.setdefault(num_drafts, [0, 0])
        count[0] += 1
        count[1] += num_accepted
    drafts = spec.counters.num_draft_tokens["draft"]
    accepted = spec.counters.num_accepted_tokens["draft"]
    print(
        json.dumps(
            {
                "model": args.model,
                "draft": args.draft,
                "draft_cost_prior": round(prior, 3),
                "draft_cost_measured": round(spec.draft_cost, 3),
                "draft_forward_ms": round(1000 * drafter.forward_seconds / drafter.num_forwards, 2),
                "draft_forwards": drafter.num_forwards,
                "drafts": drafts,
                "acceptance": round(accepted / drafts, 3) if drafts else None,
                "policy": {
                    f"k={k}": {"rows": n, "accepted": a} for k, (n, a) in sorted(policy.items())
                },
                # The rate gate (engine/spec_rates.py): steps it let draft, kept plain, probed.
                "gate": {
                    "allowed": spec.rates.num_allowed,
                    "refused": spec.rates.num_refused,
                    "probes": spec.rates.num_probes,
                    "ratio_c1": spec.rates.ratio(1),
                },
                "tok_s_off": [round(r, 2) for r in rates["off"]],
                "tok_s_draft": [round(r, 2) for r in rates["draft"]],
            }
        )
    )


if __name__ == "__main__":
    main()
