"""Step time of speculative verification against plain decode steps, and where a decode
step stops being memory-bound (the speculation policy's table).

Each case holds ``B`` running requests at a context of ``--context`` tokens (prefilled
first, not timed) and times ``--steps`` engine steps (``EngineCore.step``: scheduling, the
forward, sampling), reporting the median. ``k = 0`` is a plain decode step of ``B`` rows;
``k > 0`` gives every row ``k`` drafts (fixed tokens, mostly rejected: the step's work is
the same whatever is accepted), so the step runs ``B * (k + 1)`` rows.

    PYTHONPATH=src .venv/bin/python bench/verify_step.py
    PYTHONPATH=src .venv/bin/python bench/verify_step.py --model qwen2.5-coder-1.5b --context 1700
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rillet import LLM, SamplingParams
from rillet.engine.inputs import build_request
from rillet.engine.request import Request
from rillet.engine.speculation import SpeculationConfig, Speculator


class FixedDrafts(Speculator):
    """Always ``k`` drafts (the token after the last one, repeated): cost, not acceptance."""

    def __init__(self, k: int) -> None:
        super().__init__(SpeculationConfig("ngram", k, max_num_seqs=1 << 20))
        self.k = k

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        return [request.all_token_ids[-1]] * min(self.k, max_tokens)


def time_steps(llm: LLM, batch: int, k: int, context: int, steps: int) -> float:
    core = llm.core
    core.scheduler.speculator = FixedDrafts(k) if k else None
    vocab = llm.parts.model_config.vocab_size
    params = SamplingParams(max_new_tokens=steps * (k + 1) + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = [(17 * i + 31 * t) % (vocab - 1000) + 500 for t in range(context)]
        core.add_request(build_request(llm.tokenizer, vocab, llm.parts.max_model_len, ids, params))
    # Prefill (untimed) until every request is decoding.
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or (
        core.scheduler.num_waiting
    ):
        core.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    for rid in core.scheduler.request_ids():
        core.scheduler.abort_request(rid)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: bundled SmolLM2)")
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--batch-context", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model, enable_prefix_caching=False, max_model_len=8192)
    print(
        f"# model={llm.parts.model_name} dtype={llm.parts.dtype} threads={torch.get_num_threads()}",
        flush=True,
    )
    time_steps(llm, 1, 0, 64, 3)  # warm-up
    long = {k: time_steps(llm, 1, k, args.context, args.steps) for k in (0, args.k, 0, args.k)}
    print(
        json.dumps(
            {
                "context": args.context,
                "decode_ms": round(long[0] * 1e3, 2),
                f"verify_k{args.k}_ms": round(long[args.k] * 1e3, 2),
                "ratio": round(long[args.k] / long[0], 2),
            }
        ),
        flush=True,
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for k in (0, args.k):
            ms = time_steps(llm, batch, k, args.batch_context, args.steps) * 1e3
            print(
                json.dumps(
                    {
                        "context": args.batch_context,
                        "batch": batch,
                        "k": k,
                        "rows": batch * (k + 1),
                        "step_ms": round(ms, 2),
                        "ms_per_row": round(ms / (batch * (k + 1)), 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
