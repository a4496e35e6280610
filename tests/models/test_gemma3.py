"""Our Gemma 3 against transformers' on a tiny random-weight model: the logits of every prompt
token through chunked prefill (chunks past the sliding window), then greedy decodes, with
the native kernels and with the torch ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from fixtures_models import GEMMA_CONFIG, WINDOW
from rillet import LLM, SamplingParams
from rillet.errors import ModelLoadError
from rillet.models.config import ModelConfig


def test_config_reads_both_forms_of_gemma3_config() -> None:
    new = ModelConfig.from_hf(GEMMA_CONFIG)
    assert new.architecture == "gemma3" and new.sliding_window == WINDOW
    assert new.sliding_layers == (True, True, False, True)
    assert (new.rope_theta, new.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert new.attention_scale == 48**-0.5
    assert [new.layer_window(i) for i in range(4)] == [WINDOW, WINDOW, None, WINDOW]
    old = {k: v for k, v in GEMMA_CONFIG.items() if k not in ("layer_types", "rope_parameters")}
    old |= {"sliding_window_pattern": 3, "rope_theta": 5e5, "rope_local_base_freq": 1e4}
    parsed = ModelConfig.from_hf(old)
    assert parsed.sliding_layers == (True, True, False, True)
    assert (parsed.rope_theta, parsed.rope_local_theta) == (5e5, 1e4)
    with pytest.raises(ModelLoadError, match="final_logit_softcapping"):
        ModelConfig.from_hf({**GEMMA_CONFIG, "final_logit_softcapping": 30.0})


def _reference(folder: Path, ids: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """transformers: log-probabilities of each prompt token given the ones before, and the
    greedy continuation."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
        targets = torch.tensor(ids[1:])[:, None]
        logprobs = torch.log_softmax(logits, -1)[:-1].gather(1, targets)[:, 0]
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
        )
    return logprobs, generated[0, len(ids) :].tolist()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_tiny_gemma3_matches_transformers(tiny_gemma: Path, native: bool) -> None:
    """A 45-token prompt in chunks of 16 (so later chunks attend across blocks and past the
    window of 8), then 12 decodes, which slide the window further."""
    ids = torch.randint(3, 49152, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    expected_logprobs, expected_tokens = _reference(tiny_gemma, ids, 12)
    llm = LLM(
        str(tiny_gemma),
        dtype="float32",
        native_kernels=native,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        enable_prefix_caching=False,
    )
    params = SamplingParams(
        max_new_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=True
    )
    out = llm.generate([ids], params)[0]
    assert out.prompt_tokens is not None
    got = torch.tensor([t.logprob for t in out.prompt_tokens[1:]])
    torch.testing.assert_close(got, expected_logprobs, rtol=1e-4, atol=1e-4)
    assert out.token_ids == expected_tokens


def test_a_cached_prefix_gives_the_same_greedy_answer(tiny_gemma: Path) -> None:
    """The second request reuses the first's blocks past the window: same tokens as cold."""
    ids = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(str(tiny_gemma), dtype="float32", max_num_batched_tokens=16, max_num_seqs=4)
    cold = llm.generate([ids], params)[0]
    warm = llm.generate([ids[:-3] + ids[-3:]], params)[0]
    assert warm.num_cached_tokens > 0 and warm.token_ids == cold.token_ids
