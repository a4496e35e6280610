#!/usr/bin/env python3
"""rillet's mean NLL (and perplexity) of a fixed real text, side by side with llama.cpp's
``llama-perplexity`` on the same GGUF, and optionally their greedy answers compared.

The scoring is llama-perplexity's own (``tools/perplexity/perplexity.cpp``, no stride): the
text is tokenized whole (BOS added only if the model's tokenizer adds one), cut into
``len // ctx`` chunks of ``ctx`` tokens, each chunk evaluated from an empty cache (its first
token replaced by BOS when the model adds one), and only the second half scored: the
``ctx - ctx/2 - 1`` tokens after position ``ctx/2``, each given everything before it in its
chunk. The mean NLL is over all scored tokens; perplexity is ``exp`` of it. rillet runs with
its serving defaults (bf16 activations, the file's integer weights, 8-bit KV cache) unless
``--engine-option`` says otherwise; each chunk is one prompt scored through
``prompt_logprobs``.

The default text, ``bench/data/cpython-3.11.7-fractions.py.txt``, is ``Lib/fractions.py``
as shipped with CPython 3.11.7 (Python Software Foundation License; the license and its
copyright notice are in ``bench/data/cpython-3.11.7-LICENSE.txt``): real code for a code
model, about 7,000 tokens, so 13 chunks of 512.

``--llama-server BIN`` also starts llama-server on the same file and compares greedy
continuations of ``quantization_check.PROMPTS``, given as the same token ids to both.

    BIN=bench/.venvs/llama-server/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
    flock -w 3600 /tmp/rillet-cpu.lock .venv/bin/python bench/perplexity.py \\
        --model qwen2.5-coder-1.5b --llama-perplexity $BIN/llama-perplexity \\
        --llama-server $BIN/llama-server
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import free_port
from quantization_check import PROMPTS, common_prefix

from rillet import LLM, SamplingParams
from rillet.models.loader import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "bench" / "data" / "cpython-3.11.7-fractions.py.txt"
THREADS = 2  # both cores of the benchmark machine


@dataclass
class Scores:
    """What one system scored: the mean NLL over every scored token, and the running
    perplexity after each chunk (as llama-perplexity prints it)."""

    system: str
    mean_nll: float
    scored_tokens: int
    running_ppl: list[float]
    seconds: float


def rillet_scores(llm: LLM, tokens: list[int], ctx: int, chunks: int) -> Scores:
    """Score ``chunks`` chunks of ``ctx`` tokens as llama-perplexity does."""
    first = ctx // 2
    bos = llm.tokenizer.bos_token_id if llm.tokenizer.add_bos else None
    nll, scored, running = 0.0, 0, []
    started = time.monotonic()
    for i in range(chunks):
        ids = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            ids[0] = bos
        done = llm.generate([ids], SamplingParams(max_new_tokens=1, prompt_logprobs=True))[0]
        assert done.prompt_tokens is not None and len(done.prompt_tokens) == ctx
        # prompt_tokens[k].logprob is log p(token k | tokens before k): llama-perplexity's
        # logits at positions first..ctx-2 score tokens first+1..ctx-1.
        for k in range(first + 1, ctx):
            logprob = done.prompt_tokens[k].logprob
            assert logprob is not None
            nll -= logprob
            scored += 1
        running.append(math.exp(nll / scored))
        print(f"[rillet] chunk {i + 1}/{chunks}: perplexity so far {running[-1]:.4f}", flush=True)
    return Scores("rillet", nll / scored, scored, running, time.monotonic() - started)


_RUNNING = re.compile(r"\[(\d+)\](\d+\.\d+),")
_FINAL = re.compile(r"Final estimate: PPL = (\d+\.\d+) \+/- (\d+\.\d+)")


def llama_perplexity_scores(
    binary: str, gguf: Path, text: Path, ctx: int, chunks: int, extra: list[str], log: Path
) -> Scores:
    """Run llama-perplexity (one sequence per batch, ``THREADS`` threads) and read its
    running perplexities; its final estimate is exp of the mean NLL over all chunks."""
    command = [binary, "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx)]
    command += ["-t", str(THREADS), "--chunks", str(chunks), *extra]
    print(f"[llama.cpp] $ {' '.join(command)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"llama-perplexity exited with {done.returncode}; see {log}")
    output = done.stdout + done.stderr
    final = _FINAL.search(output)
    if final is None:
        raise RuntimeError(f"no final estimate in llama-perplexity's output; see {log}")
    running = [float(value) for _, value in _RUNNING.findall(output)]
    return Scores(
        "llama.cpp llama-perplexity",
        math.log(float(final.group(1))),  # its PPL is exp of the mean NLL
        len(running) * (ctx - ctx // 2 - 1),
        running,
        time.monotonic() - started,
    )


@contextlib.contextmanager
def llama_server(binary: str, gguf: Path, extra: list[str], log: Path) -> Iterator[str]:
    """llama-server on ``gguf`` (one slot), until /health answers; yields its URL."""
    port = free_port()
    command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-t", str(THREADS), "-np", "1", "-c", "4096", "--no-webui", *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server did not start; see {log}")
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health"):
                    break
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def llama_server_greedy(url: str, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by llama-server's /completion (token ids in and
    out, EOS ignored so both sides produce ``new_tokens``)."""
    body = {
        "prompt": prompt_ids,
        "n_predict": new_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "ignore_eos": True,
        "return_tokens": True,
        "cache_prompt": False,
    }
    request = urllib.request.Request(
        f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return [int(t) for t in json.loads(response.read())["tokens"]]


def compare_greedy(
    llm: LLM, binary: str, gguf: Path, new_tokens: int, extra: list[str], log: Path
) -> list[dict[str, object]]:
    """Per prompt: rillet's and llama-server's greedy tokens, text and common prefix."""
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rows: list[dict[str, object]] = []
    with llama_server(binary, gguf, extra, log) as url:
        for prompt in PROMPTS:
            ids = llm.tokenizer.encode(prompt)
            ours = llm.generate([ids], greedy)[0].token_ids
            theirs = llama_server_greedy(url, ids, new_tokens)
            rows.append(
                {
                    "prompt": prompt,
                    "same": ours == theirs,
                    "common_prefix": common_prefix(ours, theirs),
                    "rillet": llm.tokenizer.decode(ours),
                    "llama.cpp": llm.tokenizer.decode(theirs),
                }
            )
            print(f"[greedy] {prompt!r}: common prefix {rows[-1]['common_prefix']}", flush=True)
    return rows


def engine_options(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as LLM options (a VALUE that parses as JSON is taken as such)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    return options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="catalogue name or GGUF path (default: the bundled one)")
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama's -c)")
    parser.add_argument("--chunks", type=int, help="at most this many chunks (default: all)")
    parser.add_argument("--llama-perplexity", metavar="BIN", help="also run llama-perplexity")
    parser.add_argument("--llama-server", metavar="BIN", help="also compare greedy answers")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument(
        "--llama-args",
        default="",
        help="more options for both llama.cpp programs, one string (e.g. --no-repack)",
    )
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an LLM/EngineConfig option, e.g. kv_cache_dtype=auto (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="JSON results (default: bench/out/ppl-<time>)")
    args = parser.parse_args()

    out = args.out or ROOT / "bench" / "out" / time.strftime("ppl-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = resolve_model_path(args.model)
    llama_args = shlex.split(args.llama_args)
    llm = LLM(args.model, **engine_options(args.engine_option))
    tokens = llm.tokenizer.encode(args.text.read_text())
    chunks = len(tokens) // args.ctx
    if args.chunks:
        chunks = min(chunks, args.chunks)
    if chunks < 1:
        print(f"perplexity: {len(tokens)} tokens is less than one chunk of {args.ctx}")
        return 2
    print(f"{args.text.name}: {len(tokens)} tokens, {chunks} chunks of {args.ctx}", flush=True)
    results: list[Scores] = [rillet_scores(llm, tokens, args.ctx, chunks)]
    if args.llama_perplexity:
        log = out.with_suffix(".llama-perplexity.log")
        results.append(
            llama_perplexity_scores(
                args.llama_perplexity, gguf, args.text, args.ctx, chunks, llama_args, log
            )
        )
    greedy = (
        compare_greedy(
            llm,
            args.llama_server,
            gguf,
            args.new_tokens,
            llama_args,
            out.with_suffix(".llama-server.log"),
        )
        if args.llama_server
        else []
    )

    print(f"\n{gguf.name}, {args.text.name}, ctx {args.ctx}, {chunks} chunks\n")
    print("| system | scored tokens | mean NLL (nats/token) | perplexity | seconds |")
    print("|---|---|---|---|---|")
    for s in results:
        print(
            f"| {s.system} | {s.scored_tokens} | {s.mean_nll:.4f} | {math.exp(s.mean_nll):.4f} "
            f"| {s.seconds:.0f} |"
        )
    if len(results) == 2:
        ours, theirs = results
        print(
            f"\nrillet's mean NLL is {100 * (ours.mean_nll / theirs.mean_nll - 1):+.2f} %"
            " off llama.cpp's"
        )
        pairs = zip(ours.running_ppl, theirs.running_ppl, strict=False)
        print(
            "running perplexity (rillet/llama.cpp): "
            + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in pairs)
        )
    if greedy:
        same = sum(bool(r["same"]) for r in greedy)
        prefix = sum(int(str(r["common_prefix"])) for r in greedy) / len(greedy)
        print(
            f"\ngreedy: {same}/{len(greedy)} identical over {args.new_tokens} tokens, "
            f"mean common prefix {prefix:.1f}"
        )
        for r in greedy:
            print(f"- {r['prompt']!r}: rillet {r['rillet']!r} | llama.cpp {r['llama.cpp']!r}")
    record = {
        "model": str(gguf),
        "text": str(args.text),
        "ctx": args.ctx,
        "chunks": chunks,
        "tokens": len(tokens),
        "results": [asdict(s) for s in results],
        "greedy": greedy,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
