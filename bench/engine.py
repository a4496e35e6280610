"""Offline engine throughput on the bundled model (no HTTP): the ceiling the server can reach.

For each concurrency N, N requests of ``--prompt-tokens`` random prompt ids each generate
exactly ``--output-tokens`` tokens (ignore_eos) in one continuous batch. Reported:
aggregate output tokens/s (wall clock, prefill included), the decode-only step rate, and
single-stream decode tokens/s (N=1, after the first token).

    python bench/engine.py                       # 1, 8, 32, 64 concurrent, fp32
    python bench/engine.py --dtype bfloat16 --concurrency 1 64
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from rillet import LLM, SamplingParams
from rillet.engine.inputs import build_request
from rillet.protocol import EngineRequest


def run_level(llm: LLM, n: int, prompt_tokens: int, output_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = llm.parts.model_config.vocab_size
    params = SamplingParams(max_new_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    requests: list[EngineRequest] = [
        build_request(
            llm.tokenizer,
            vocab,
            llm.parts.max_model_len,
            [rng.randrange(100, vocab) for _ in range(prompt_tokens)],
            params,
        )
        for _ in range(n)
    ]
    core = llm.core
    start = time.perf_counter()
    for r in requests:
        core.add_request(r)
    first_token_at: dict[str, float] = {}
    decode_steps: list[tuple[float, int]] = []  # (seconds, tokens) of steps with no prefill
    generated = 0
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        computed_before = core.counters.num_prompt_tokens_computed
        deltas = core.step()
        t1 = time.perf_counter()
        new = sum(len(d.new_token_ids) for d in deltas)
        generated += new
        for d in deltas:
            if d.new_token_ids and d.request_id not in first_token_at:
                first_token_at[d.request_id] = t1 - start
        if core.counters.num_prompt_tokens_computed == computed_before and new:
            decode_steps.append((t1 - t0, new))
    wall = time.perf_counter() - start
    decode_time = sum(s for s, _ in decode_steps)
    decode_tokens = sum(t for _, t in decode_steps)
    return {
        "concurrency": n,
        "output_tokens": generated,
        "wall_s": round(wall, 3),
        "output_tok_s": round(generated / wall, 1),
        "decode_tok_s": round(decode_tokens / decode_time, 1) if decode_time else None,
        "mean_decode_step_ms": round(1000 * decode_time / len(decode_steps), 2)
        if decode_steps
        else None,
        "ttft_max_s": round(max(first_token_at.values()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: bundled SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    print(
        f"# model={llm.parts.model_name} dtype={llm.parts.dtype} threads={torch.get_num_threads()}"
        f" torch={torch.__version__}",
        flush=True,
    )
    run_level(llm, 2, 16, 8, args.seed)  # warm-up
    for n in args.concurrency:
        print(
            json.dumps(run_level(llm, n, args.prompt_tokens, args.output_tokens, args.seed)),
            flush=True,
        )


if __name__ == "__main__":
    main()
