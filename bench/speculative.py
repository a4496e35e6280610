"""Speculative decoding on a code-editing workload: single-stream decode tok/s, with and
without n-gram (prompt lookup) drafts.

The prompt holds a source file (``--source``, default this repo's block manager, ~230
lines) and asks for it back with one small change, so most output tokens are in the
prompt. One request at a time (c = 1), greedy, ``--output-tokens`` tokens. Reported per
run: decode tok/s after the first token (wall clock between the first and the last token),
steps, and the acceptance (accepted / proposed drafts). Runs alternate off / ngram so a
noisy machine's drift hits both; each line of the summary is the median of ``--repeats``.

    PYTHONPATH=src .venv/bin/python bench/speculative.py
    PYTHONPATH=src .venv/bin/python bench/speculative.py --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rillet import LLM, SamplingParams
from rillet.engine.inputs import build_request

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / "src/rillet/engine/block_manager.py"
INSTRUCTION = (
    "Here is a Python file. Return the whole file, unchanged except that the method "
    "`num_free_blocks` is renamed to `free_block_count`. Reply with the code only.\n\n"
)


def prompt_ids(llm: LLM, source: str) -> list[int]:
    messages = [{"role": "user", "content": INSTRUCTION + "```python\n" + source + "```"}]
    text = llm.tokenizer.apply_chat_template(messages) + "```python\n"
    return llm.tokenizer.encode(text, add_special_tokens=False)


def run_once(llm: LLM, ids: list[int], output_tokens: int) -> dict[str, float | str]:
    core = llm.core
    params = SamplingParams(max_new_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    vocab = llm.parts.model_config.vocab_size
    core.add_request(build_request(llm.tokenizer, vocab, llm.parts.max_model_len, ids, params))
    spec = core.scheduler.speculator
    drafts_before = sum(spec.counters.num_draft_tokens.values()) if spec else 0
    accepted_before = sum(spec.counters.num_accepted_tokens.values()) if spec else 0
    steps_before = core.counters.num_steps
    first = last = 0.0
    tokens: list[int] = []
    while core.has_unfinished_requests():
        for delta in core.step():
            if delta.new_token_ids and not tokens:
                first = time.perf_counter()
                steps_before = core.counters.num_steps
            tokens.extend(delta.new_token_ids)
        last = time.perf_counter()
    drafts = (sum(spec.counters.num_draft_tokens.values()) - drafts_before) if spec else 0
    accepted = (sum(spec.counters.num_accepted_tokens.values()) - accepted_before) if spec else 0
    return {
        "decode_tok_s": (len(tokens) - 1) / (last - first),
        "decode_steps": core.counters.num_steps - steps_before,
        "acceptance": accepted / drafts if drafts else 0.0,
        "text_head": llm.tokenizer.decode(tokens[:40]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: bundled SmolLM2)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    options: dict[str, object] = {"enable_prefix_caching": False, "max_model_len": 8192}
    engines = {
        "off": LLM(args.model, **options),
        "ngram": LLM(
            args.model,
            speculative="ngram",
            num_speculative_tokens=args.num_speculative_tokens,
            **options,
        ),
    }
    ids = prompt_ids(engines["off"], args.source.read_text())
    print(
        f"# model={engines['off'].parts.model_name} dtype={engines['off'].parts.dtype} "
        f"threads={torch.get_num_threads()} prompt_tokens={len(ids)} "
        f"output_tokens={args.output_tokens} k={args.num_speculative_tokens}",
        flush=True,
    )
    for llm in engines.values():
        run_once(llm, ids[:64], 8)  # warm-up
    results: dict[str, list[dict[str, float | str]]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            result = run_once(llm, ids, args.output_tokens)
            results[name].append(result)
            print(json.dumps({"speculative": name, **result}), flush=True)
    medians = {
        name: statistics.median(float(r["decode_tok_s"]) for r in runs)
        for name, runs in results.items()
    }
    print(
        json.dumps(
            {
                "median_decode_tok_s": {k: round(v, 1) for k, v in medians.items()},
                "speedup": round(medians["ngram"] / medians["off"], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
