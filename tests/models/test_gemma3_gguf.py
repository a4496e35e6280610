"""The real Gemma 3 270M (Q4_K_M GGUF, the catalogue's ``gemma3-270m``, which the setup script
pulls):
tokens, and greedy continuations, equal to transformers loading the same file; served, it
streams through the TGI and OpenAI routes with their own clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import transformers
from huggingface_hub import InferenceClient

from rillet import LLM, SamplingParams
from rillet.models.loader import load_model_files, resolve_model_path
from server_process import ServerHandle, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    """The assembled file (setup already joined it: this only finds and checks it)."""
    return resolve_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def transformers_gemma(gemma_gguf: Path) -> tuple[object, object]:
    kwargs = {"gguf_file": gemma_gguf.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gemma_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gemma_gguf.parent, dtype=torch.float32, **kwargs
    ).eval()
    return tokenizer, model


def test_tokenizer_and_template_match_transformers(gemma_gguf: Path, transformers_gemma) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _ = transformers_gemma
    ours = load_model_files(str(gemma_gguf)).tokenizer
    for text in [*PROMPTS, "Streaming: один за другим, 一个接一个 🚀 ", "  two  spaces\n\ttab"]:
        assert ours.encode(text, add_special_tokens=True) == tokenizer(text)["input_ids"], text
    # The file carries no chat template: Gemma's turns, ending at <end_of_turn>.
    rendered = ours.apply_chat_template([{"role": "user", "content": "Hi"}], True)
    assert rendered == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert ours.backend.token_to_id("<end_of_turn>") in ours.eos_token_ids


def test_greedy_continuations_match_transformers(gemma_gguf: Path, transformers_gemma) -> None:  # type: ignore[no-untyped-def]
    """fp32 on both sides, the file's weights dequantized alike: the same 16 tokens."""
    tokenizer, model = transformers_gemma
    llm = LLM(str(gemma_gguf), dtype="float32")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            theirs = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
            )[0, len(ids) :].tolist()
        assert llm.generate([ids], params)[0].token_ids == theirs, prompt


@pytest.fixture(scope="module")
def gemma_server(gemma_gguf: Path) -> Iterator[ServerHandle]:
    handle = start_server(["--model", str(gemma_gguf), "--served-model-name", "gemma3"])
    yield handle
    handle.stop()


def test_streams_through_the_tgi_route(gemma_server: ServerHandle) -> None:
    client = InferenceClient(gemma_server.url, timeout=120)
    outputs = list(
        client.text_generation(
            PROMPTS[0], max_new_tokens=8, stream=True, details=True, return_full_text=False
        )
    )
    assert [o.index for o in outputs] == list(range(1, 9))
    assert outputs[-1].details is not None and outputs[-1].details.finish_reason == "length"
    text = outputs[-1].generated_text
    assert text == "".join(o.token.text for o in outputs) and text.strip()


def test_streams_through_the_openai_route(gemma_server: ServerHandle) -> None:
    client = openai.OpenAI(base_url=f"{gemma_server.url}/v1", api_key="-", timeout=120)
    question = [{"role": "user", "content": "What is the capital of France? One word."}]
    chunks = list(
        client.chat.completions.create(
            model="gemma3",
            messages=question,
            max_tokens=24,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(repr(text))
    assert text.strip() and "<end_of_turn>" not in text
    # (The 270M base model rarely ends its turn in 24 tokens; either end is a right one.)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
