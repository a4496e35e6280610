"""Do bf16, the integer weights or the 8-bit KV cache change what a model says? Measured.

Engines on one GGUF (default: the bundled SmolLM2, a Q4_1 GGUF with a Q8_0 embedding;
``--model`` another), each fed steps of at most 8 tokens (``max_num_batched_tokens=8``):

- ``fp32``: the reference (exact: float32 weights as dequantized from the GGUF file);
- ``bf16``: bf16 weights and activations, no quantized copies (``--quantized-max-batch-tokens 0``)
  and K/V in bf16 (``--kv-cache-dtype auto``);
- ``bf16+int``: the file's own integers (``models.gguf_codes``: Q4_* on the 4-bit kernel,
  Q5_*/Q8_0 on the 8-bit one; other formats quantized again at 8 bits) read with integer
  dot products, inputs rounded to 8 bits per group of 32 as llama.cpp does; K/V in bf16;
- ``bf16+int, re-quantized``: the same kernels on copies quantized from the dequantized
  floats instead of the file's codes (what rillet did before it read them);
- ``bf16+int+8-bit KV (default)``: the serving default, ``bf16+int`` with the 8-bit KV cache.
  The text goes in 8-token steps, so nearly every score attends to K/V read back from the
  cache.

For each it reports the mean negative log-likelihood of a fixed English text (teacher
forced, through prompt logprobs) and, against fp32, how many greedy continuations of 16
prompts are identical and how long their common prefix is.

``--llama-cpp-python PY`` adds llama.cpp itself (through llama-cpp-python in the Python
``PY``, e.g. the peer venv ``bench/compare.py`` makes) on the same file and the same token
ids: the reference for what the file's 4-bit weights should give.

    .venv/bin/python bench/quantization_check.py \
        [--model FILE.gguf] [--llama-cpp-python bench/.venvs/llamacpp/bin/python]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

from rillet import LLM, SamplingParams
from rillet.models import gguf_weights
from rillet.models.loader import resolve_model_path

_FILE_CODES = gguf_weights.iter_gguf_group_codes

TEXT = (
    "Streaming changes how a language model feels to use. Instead of waiting for the whole "
    "answer, the reader sees the first words within a fraction of a second and can start "
    "reading while the rest is still being written. The server keeps many conversations in "
    "one batch, adds new ones as soon as there is room, and sends every token the moment it "
    "is chosen. When the machine is full, it says so at once instead of letting requests "
    "wait without end. The same engine answers through several doors: the text generation "
    "interface with server-sent events, the chat completions interface that many tools "
    "already speak, plain text over HTTP, and a socket for chat. Small models run well on "
    "ordinary processors when the work is arranged with care: weights are read once per "
    "step for the whole batch, attention reads the cache where it lies, and the Python "
    "code between the heavy operations is kept short."
)

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The theory of relativity says that",
    "A list of healthy breakfast ideas:\n1.",
    "Water boils at",
    "The best way to learn a new language is",
    "In 1969, astronauts",
    "import numpy as np\n\n# compute the mean of",
    "Dear hiring manager,\n",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "Q: What is 12 times 12?\nA:",
]

CONFIGS: dict[str, dict[str, object]] = {
    "fp32": {"dtype": "float32", "quantized_max_batch_tokens": 0},
    "bf16": {"dtype": "bfloat16", "quantized_max_batch_tokens": 0, "kv_cache_dtype": "auto"},
    "bf16+int": {"dtype": "bfloat16", "kv_cache_dtype": "auto"},
    "bf16+int, re-quantized": {"dtype": "bfloat16", "file_codes": False, "kv_cache_dtype": "auto"},
    "bf16+int+8-bit KV (default)": {"dtype": "bfloat16"},
}


def evaluate(
    model: str | None, options: dict[str, object], new_tokens: int, text: str = TEXT
) -> dict[str, object]:
    options = dict(options)
    if not options.pop("file_codes", True):
        # The loader finds no codes: every copy is quantized from the floats, as before.
        gguf_weights.iter_gguf_group_codes = lambda reader, config: iter(())  # type: ignore[assignment]
    llm = LLM(model, max_num_batched_tokens=8, max_num_seqs=8, **options)
    gguf_weights.iter_gguf_group_codes = _FILE_CODES
    scored = llm.generate(text, SamplingParams(max_new_tokens=1, prompt_logprobs=True))[0]
    assert scored.prompt_tokens is not None
    logprobs = [t.logprob for t in scored.prompt_tokens if t.logprob is not None]
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # One prompt at a time: a single row per step, the c=1 serving case.
    completions = [llm.generate(p, greedy)[0] for p in PROMPTS]
    return {
        "nll": -sum(logprobs) / len(logprobs),
        "tokens": len(logprobs),
        "outputs": [c.token_ids for c in completions],
        "text_ids": scored.prompt_token_ids,
        "prompt_ids": [c.prompt_token_ids for c in completions],
    }


#: Run in llama-cpp-python's interpreter: teacher-forced NLL and greedy continuations of
#: the token ids it is given, on the bundled GGUF.
_LLAMA_CPP_SCRIPT = """
import json, math, sys
from llama_cpp import Llama
job = json.load(sys.stdin)
n_ctx = len(job["text_ids"]) + 16
llm = Llama(model_path=job["model"], n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)
ids = job["text_ids"]
llm.reset()
llm.eval(ids)
nll = 0.0
for i in range(len(ids) - 1):
    row = llm.scores[i]
    top = float(row.max())
    log_z = top + math.log(float(sum(math.exp(float(v) - top) for v in row)))
    nll -= float(row[ids[i + 1]]) - log_z
outputs = []
for prompt in job["prompt_ids"]:
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == job["new_tokens"]:
            break
    outputs.append(tokens)
print(json.dumps({"nll": nll / (len(ids) - 1), "tokens": len(ids) - 1, "outputs": outputs}))
"""


def evaluate_llama_cpp(
    python: str, model: str | None, reference: dict[str, object], new_tokens: int
) -> dict[str, object]:
    """llama.cpp on the same file, fed the token ids rillet's fp32 run used."""
    job = {
        "model": str(resolve_model_path(model)),
        "text_ids": reference["text_ids"],
        "prompt_ids": reference["prompt_ids"],
        "new_tokens": new_tokens,
    }
    done = subprocess.run(
        [python, "-c", _LLAMA_CPP_SCRIPT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--llama-cpp-python", metavar="PY", help="add llama.cpp through this Python"
    )
    parser.add_argument("--text-file", type=Path, help="score this text instead of TEXT")
    parser.add_argument("--model", help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument(
        "--only", action="append", choices=list(CONFIGS), help="run these configs (fp32 always)"
    )
    args = parser.parse_args()
    text = args.text_file.read_text() if args.text_file else TEXT
    chosen = {"fp32", *args.only} if args.only else set(CONFIGS)
    results = {
        name: evaluate(args.model, opts, args.new_tokens, text)
        for name, opts in CONFIGS.items()
        if name in chosen
    }
    if args.llama_cpp_python:
        results["llama.cpp (llama-cpp-python)"] = evaluate_llama_cpp(
            args.llama_cpp_python, args.model, results["fp32"], args.new_tokens
        )
    reference = results["fp32"]["outputs"]
    print(
        "| config | NLL of the text (nats/token) | perplexity "
        "| greedy outputs equal to fp32 | mean common prefix with fp32 |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        outputs = r["outputs"]
        assert isinstance(outputs, list) and isinstance(reference, list)
        same = sum(o == ref for o, ref in zip(outputs, reference, strict=True))
        prefix = sum(common_prefix(o, ref) for o, ref in zip(outputs, reference, strict=True))
        nll = float(r["nll"])  # type: ignore[arg-type]
        print(
            f"| {name} | {nll:.4f} | {math.exp(nll):.3f} | {same}/{len(PROMPTS)} | "
            f"{prefix / len(PROMPTS):.1f} of {args.new_tokens} |"
        )
    print(json.dumps({n: {"nll": r["nll"], "tokens": r["tokens"]} for n, r in results.items()}))


if __name__ == "__main__":
    main()
