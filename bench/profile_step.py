"""Where one engine step's time goes, at a given number of running requests (no HTTP).

Starts N requests of ``--prompt-tokens`` (128) random prompt tokens (greedy,
``ignore_eos``), steps until every prompt is in and the batch is decoding, then times
``--steps`` decode steps and prints the mean. ``--profile torch`` adds torch.profiler's op
table (aten ops only: the native kernels are not aten ops and do not show there);
``--profile python`` adds a cProfile table, which does show them. The step's CPU time (all
threads) is printed beside its wall time: on a shared machine, ``OMP_NUM_THREADS=1`` and the
CPU time measure the work with far less noise from others' jobs.

    .venv/bin/python bench/profile_step.py 1 --profile torch
    .venv/bin/python bench/profile_step.py 64 --profile python
    .venv/bin/python bench/profile_step.py 1 --small-batch-tokens 4   # one thread, as served
    .venv/bin/python bench/profile_step.py 16 --prefill-chunk 128      # + a 128-token chunk
    .venv/bin/python bench/profile_step.py 64 --prompt-tokens 1024     # long contexts
    .venv/bin/python bench/profile_step.py 1 --json-schema             # a grammar per row

``--prefill-chunk P`` then adds one ``--prefill-prompt``-token prompt and times the steps
that carry it, ``P`` tokens at a time, beside the N decodes: what a prefilling prompt costs
every running stream's inter-token latency, and what the cap costs the prompt's TTFT.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import random
import time

import torch

from rillet import LLM, SamplingParams
from rillet.benchmark.constraint import LONG_SCHEMA
from rillet.constraint import Constraint
from rillet.engine.inputs import build_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requests", type=int)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", help="default: the bundled model")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="each running request's")
    parser.add_argument("--profile", choices=["torch", "python"])
    parser.add_argument("--small-batch-tokens", type=int, default=0)
    parser.add_argument("--prefill-chunk", type=int, default=0, help="prefill tokens per step")
    parser.add_argument("--prefill-prompt", type=int, default=1024, help="its prompt's tokens")
    parser.add_argument("--quantized-max-batch-tokens", type=int, default=None)
    parser.add_argument(
        "--no-decoder-stack", action="store_true", help="decode steps through the Python layers"
    )
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    parser.add_argument(
        "--json-schema",
        action="store_true",
        help="hold every request to `rillet bench`'s built-in schema (a grammar per row)",
    )
    args = parser.parse_args()

    llm = LLM(
        args.model,
        small_batch_tokens=args.small_batch_tokens,
        quantized_max_batch_tokens=args.quantized_max_batch_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    core, vocab = llm.core, llm.parts.model_config.vocab_size
    if args.no_decoder_stack:
        core.runner.model.decoder_stack = None
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    if args.json_schema:
        # A grammar's end cannot be ignored; the schema (64+ people) outlasts the steps.
        params = dataclasses.replace(
            params, ignore_eos=False, constraint=Constraint.json_schema(LONG_SCHEMA)
        )
    running = []
    for _ in range(args.requests):
        prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]
        request = build_request(llm.tokenizer, vocab, llm.parts.max_model_len, prompt, params)
        core.add_request(request)
        running.append(request.request_id)
    while True:  # until every prompt is in and the batch is decoding, then a few more
        core.step()
        live = [core.scheduler.get_request(rid) for rid in running]
        if all(r is not None and r.num_output_tokens > 0 for r in live):
            break
    for _ in range(5):
        core.step()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        core.step()
    step = (time.perf_counter() - start) / args.steps
    # CPU time of every thread of the process (the grammar library's too): on a busy shared
    # machine it moves far less than wall time, whose waits for a core it does not count.
    cpu = (time.process_time() - cpu_start) / args.steps
    print(
        f"{args.requests} running: decode step {step * 1e3:.2f} ms, "
        f"{args.requests / step:.1f} tok/s, {torch.get_num_threads()} torch threads, "
        f"{cpu * 1e3:.2f} ms of CPU a step"
    )
    if args.prefill_chunk:
        # Set now, not at start: under the cap the N prompts above would still be prefilling.
        scheduler = core.scheduler
        scheduler.config = dataclasses.replace(
            scheduler.config, max_prefill_tokens_when_decoding=args.prefill_chunk
        )
        prompt = [rng.randrange(100, vocab) for _ in range(args.prefill_prompt)]
        request = build_request(llm.tokenizer, vocab, llm.parts.max_model_len, prompt, params)
        core.add_request(request)
        live = core.scheduler.get_request(request.request_id)
        assert live is not None
        steps, start = 0, time.perf_counter()
        while live.num_output_tokens == 0:
            core.step()
            steps += 1
        mixed = (time.perf_counter() - start) / steps
        print(
            f"+ a {args.prefill_prompt}-token prompt in {args.prefill_chunk}-token chunks: "
            f"{steps} steps of {mixed * 1e3:.1f} ms ({mixed / step:.2f}x the decode step), "
            f"first token after {steps * mixed:.2f} s"
        )
    if args.profile == "torch":
        with torch.profiler.profile() as prof:
            for _ in range(10):
                core.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    elif args.profile == "python":
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            core.step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
