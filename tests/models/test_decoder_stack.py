"""The native decoder stacks (``models/decoder_stack.py``: Llama's and Gemma 3's) give the
Python layers' results bit for bit, and the engine takes them for decode-only steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rillet import LLM, SamplingParams
from rillet.models.attention import AttentionMetadata, allocate_kv_caches

BLOCK_SIZE = 16


def _quantized_llm(model: Path | None, native) -> LLM:  # type: ignore[no-untyped-def]
    if not native.quantized_linear_supported():
        pytest.skip("this CPU build has no AVX512-VNNI quantized kernel")
    return LLM(
        None if model is None else str(model),
        dtype="bfloat16",
        quantized_max_batch_tokens=64,
        max_num_batched_tokens=64,
        max_num_seqs=16,
        num_kv_blocks=64,
        max_model_len=1024,
    )


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
@torch.no_grad()
def test_stack_matches_the_python_layers_bit_for_bit(
    native, tiny_model_dir: Path, rows: int, qkv_bias: bool
) -> None:  # type: ignore[no-untyped-def]
    model = _quantized_llm(tiny_model_dir, native).core.runner.model
    gen = torch.Generator().manual_seed(rows)
    for name, param in model.named_parameters():
        if "norm" in name:  # the tiny model's norms are all ones: make each one distinct
            param.copy_(1 + torch.randn(param.shape, generator=gen) / 4)
    if qkv_bias:  # as Qwen2 has: the one bias the stack takes
        for layer in model.layers:
            qkv = layer.self_attn.qkv_proj
            bias = torch.randn(qkv.out_features, generator=gen) / 4
            qkv.bias = torch.nn.Parameter(bias.to(torch.bfloat16))
    _check_stack_against_the_layers(model, native, rows, gen)


@pytest.mark.parametrize("rows", [1, 3, 8])
@torch.no_grad()
def test_gemma3_stack_matches_the_python_layers_bit_for_bit(
    native, tiny_gemma: Path, rows: int
) -> None:  # type: ignore[no-untyped-def]
    # Contexts of 21 to 70 tokens: the local layers' window of 8 cuts every one of them.
    model = _quantized_llm(tiny_gemma, native).core.runner.model
    _check_stack_against_the_layers(model, native, rows, torch.Generator().manual_seed(rows))


def _check_stack_against_the_layers(model, native, rows: int, gen: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    cfg = model.config
    caches = allocate_kv_caches(
        cfg.num_layers, 64, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, "cpu"
    )
    for key_cache, value_cache in caches:  # earlier context: random K/V
        key_cache.copy_(torch.randn(key_cache.shape, generator=gen))
        value_cache.copy_(torch.randn(value_cache.shape, generator=gen))
    python_caches = [(k.clone(), v.clone()) for k, v in caches]
    # Row i decodes at position 20 + 7 i in blocks [5 i, 5 i + 1, ...].
    lens = torch.tensor([21 + 7 * i for i in range(rows)])
    tables = torch.tensor([[5 * i + j for j in range(5)] for i in range(rows)])
    positions = lens - 1
    slots = tables.gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE
    slots += positions % BLOCK_SIZE
    meta = AttentionMetadata(
        slot_mapping=slots,
        positions=positions,
        num_decode_tokens=rows,
        decode_block_ids=tables,
        decode_context_lens=lens,
        native=native,
    )
    ids = torch.randint(0, cfg.vocab_size, (rows,), generator=gen)

    model.decoder_stack = None
    expected = model(ids, python_caches, meta)
    stack = model.build_decoder_stack(caches, native)
    assert stack is not None and stack.covers(rows, caches, meta)
    assert not stack.covers(rows, python_caches, meta)  # not the caches it writes to
    model.decoder_stack = stack
    got = model(ids, caches, meta)

    assert torch.equal(got, expected)
    for (k, v), (pk, pv) in zip(caches, python_caches, strict=True):
        assert torch.equal(k, pk) and torch.equal(v, pv)  # the same K/V written


@pytest.mark.parametrize("model", ["bundled", "tiny_gemma"])
def test_engine_takes_the_stack_for_decodes_and_its_tokens_match(  # type: ignore[no-untyped-def]
    native, request: pytest.FixtureRequest, model: str
) -> None:
    folder = None if model == "bundled" else request.getfixturevalue(model)
    llm = _quantized_llm(folder, native)
    causal_lm = llm.core.runner.model
    assert causal_lm.decoder_stack is not None
    prompts = ["The capital of France is", "Write a haiku about rivers.", "def add(a, b):"]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    with_stack = llm.generate(prompts, greedy)
    stack, causal_lm.decoder_stack = causal_lm.decoder_stack, None
    without = llm.generate(prompts, greedy)
    causal_lm.decoder_stack = stack
    for a, b in zip(with_stack, without, strict=True):
        assert a.token_ids == b.token_ids
        assert [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]


def test_no_stack_without_quantized_weights(native, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(tiny_model_dir), dtype="bfloat16", quantized_max_batch_tokens=0)
    assert llm.core.runner.model.decoder_stack is None
