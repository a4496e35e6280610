"""rillet.models.loader: HF folders and GGUF files, checked against what was written and
against transformers reading the same files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from model_files import (
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    QTYPES,
    TOKENS,
    k_quant_bytes,
    tiny_hf_config,
    tiny_state_dict,
    to_gguf_name,
    write_gguf,
    write_hf_folder,
)
from rillet.errors import ModelLoadError
from rillet.models import gguf_weights, load_model_files, resolve_model_path
from rillet.models.gguf_weights import dequantize_tensor, open_gguf

transformers = pytest.importorskip("transformers")
from transformers.integrations.gguf import dequant as hf_dequant  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import (  # noqa: E402
    LlamaTensorProcessor,
    get_gguf_hf_weights_map,
    load_gguf_checkpoint,
)


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_loads_what_was_written(tmp_path: Path, shards: int) -> None:
    state = tiny_state_dict()
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)  # dtype kept
    write_hf_folder(tmp_path / "tiny-llama", state, shards=shards)
    loaded = load_model_files(str(tmp_path / "tiny-llama"))
    cfg = loaded.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("llama", LAYERS, HIDDEN)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert cfg.vocab_size == len(TOKENS) and not cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (256, 257)  # config.json + generation_config.json
    assert loaded.tokenizer.eos_token_ids == frozenset({256, 257})
    assert loaded.generation_defaults == {"eos_token_id": [257], "temperature": 0.6}
    assert loaded.name == "tiny-llama" and loaded.path == tmp_path / "tiny-llama"
    weights = dict(loaded.weights())
    assert weights.keys() == state.keys()
    for name, tensor in state.items():
        assert weights[name].dtype == tensor.dtype
        assert torch.equal(weights[name], tensor), name
    assert len(dict(loaded.weights())) == len(state)  # a second pass works too


def test_hf_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_files(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model_files(str(empty))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model_files(str(gpt2))
    (empty / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model_files(str(empty))
    (empty / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model_files(str(empty))


def transformers_gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """What transformers itself makes of a GGUF file's tensors (names, layout, values)."""
    cfg = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return dict(tensors)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_gguf(tmp_path: Path, tied: bool) -> None:
    state = tiny_state_dict()
    write_gguf(tmp_path / "tiny.gguf", state, tied=tied, temperature=0.5)
    loaded = load_model_files(str(tmp_path / "tiny.gguf"))
    assert loaded.generation_defaults == {"temperature": 0.5}
    cfg = loaded.config
    assert cfg.architecture == "llama" and cfg.tie_word_embeddings == tied
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (LAYERS, HIDDEN, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert (cfg.vocab_size, cfg.eos_token_ids, cfg.max_position_embeddings) == (258, (257,), 256)
    assert loaded.name == "tiny" and loaded.tokenizer.encode("hi<|im_end|>") == [71, 72, 257]
    assert loaded.layer_weight_bits is None  # some of its layers' matrices are floats
    weights = dict(loaded.weights())
    expected = {k for k in state if not (tied and k == "lm_head.weight")}
    assert weights.keys() == expected
    for name in expected:
        original, got = state[name], weights[name]
        qtype = QTYPES.get(to_gguf_name(name), Q.F32)
        assert got.shape == original.shape, name
        assert got.dtype == {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
        # Relative to the tensor's scale: exact for F32, quantization error otherwise. A wrong
        # q/k un-permutation would move whole rows and fail this by far.
        tolerance = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2}.get(qtype, 0.15)
        error = (got.float() - original).abs().max() / original.abs().max()
        assert error <= tolerance, (name, qtype.name, float(error))
    reference = transformers_gguf_tensors(tmp_path / "tiny.gguf")
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor.float(), weights[name].float()), name


def test_layer_weight_bits_is_the_widest_integer_format_of_the_layers() -> None:
    def tensors(*types: Q) -> list[Any]:
        layers = [
            SimpleNamespace(name=f"blk.{i}.ffn_up.weight", tensor_type=t, shape=np.array([64, 32]))
            for i, t in enumerate(types)
        ]
        # Neither the embedding nor 1-D norms count: only the layers' matrices.
        others = [
            SimpleNamespace(name="token_embd.weight", tensor_type=Q.F16, shape=np.array([64, 9])),
            SimpleNamespace(name="blk.0.attn_norm.weight", tensor_type=Q.F32, shape=np.array([64])),
        ]
        return layers + others

    assert gguf_weights.layer_weight_bits(tensors(Q.Q4_1, Q.Q4_0, Q.Q4_K)) == 4
    assert gguf_weights.layer_weight_bits(tensors(Q.Q4_1, Q.Q6_K)) == 6
    assert gguf_weights.layer_weight_bits(tensors(Q.IQ4_NL, Q.Q2_K)) == 4
    assert gguf_weights.layer_weight_bits(tensors(Q.Q4_1, Q.BF16)) is None
    assert gguf_weights.layer_weight_bits(tensors()) is None


def test_tiny_qwen2_gguf_keeps_rows_and_biases(tmp_path: Path) -> None:
    state = tiny_state_dict("qwen2")
    assert "model.layers.0.self_attn.q_proj.bias" in state
    write_gguf(tmp_path / "qwen.gguf", state, arch="qwen2")
    loaded = load_model_files(str(tmp_path / "qwen.gguf"))
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias
    weights = dict(loaded.weights())
    assert weights.keys() == state.keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(weights[name].float(), state[name]), name
    reference = transformers_gguf_tensors(tmp_path / "qwen.gguf")
    for name, tensor in reference.items():
        assert torch.equal(tensor.float(), weights[name].float()), name


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
)
def test_dequantize_matches_transformers(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    rows, cols = 3, 512
    values = rng.normal(size=(rows, cols)).astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf cannot write these: make valid blocks by hand
        raw = k_quant_bytes(qtype, rows, rng)
    else:
        raw = values if qtype == Q.F32 else quantize(values, qtype)
    writer = gguf.GGUFWriter(tmp_path / "one.gguf", "llama")
    writer.add_tensor("t", raw, raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = open_gguf(tmp_path / "one.gguf").tensors
    got = dequantize_tensor(tensor)
    assert got.shape == (rows, cols)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        tolerance = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2}[qtype]
        assert float((got.float() - torch.from_numpy(values)).abs().max()) <= tolerance * 4
        return
    assert got.dtype == torch.float32
    flat = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).copy())
    reference = hf_dequant.dequantize(flat, int(qtype)).reshape(rows, cols)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):  # and near the values that were quantized
        scale = float(np.abs(values).max())
        assert float((got - torch.from_numpy(values)).abs().max()) < scale * 0.15


def test_gguf_errors(tmp_path: Path) -> None:
    state = tiny_state_dict()
    write_gguf(tmp_path / "good.gguf", state)
    data = (tmp_path / "good.gguf").read_bytes()
    for cut in (10, 2000, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated or corrupt"):
            load_model_files(str(tmp_path / "cut.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model_files(str(tmp_path / "junk.gguf"))
    write_gguf(tmp_path / "gpt2.gguf", state, arch="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2' in GGUF"):
        load_model_files(str(tmp_path / "gpt2.gguf"))


def test_folder_with_one_gguf_and_other_paths(tmp_path: Path) -> None:
    write_gguf(tmp_path / "only.gguf", tiny_state_dict())
    assert load_model_files(str(tmp_path)).name == "only"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="neither"):
        load_model_files(str(tmp_path / "notes.txt"))


@pytest.fixture(scope="module")
def bundled() -> Any:
    return load_model_files(None)


def test_bundled_gguf_config(bundled: Any) -> None:
    assert resolve_model_path(None) == bundled.path
    cfg = bundled.config
    assert cfg.architecture == "llama"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == (49152, True, 100000.0)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position_embeddings) == (1, (2,), 8192)
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert bundled.name == "SmolLM2-135M-Instruct.Q4_1"
    assert bundled.layer_weight_bits == 4
    assert bundled.tokenizer.vocab_size == 49152


def test_bundled_gguf_tensors_match_transformers(bundled: Any) -> None:
    # The first tensors cover Q8_0 (embedding), Q4_1 (matrices), F32 (norms) and the q/k
    # permutation; transformers' own per-tensor GGUF path is the reference.
    ours = dict(itertools.islice(bundled.weights(), 10))
    assert "model.layers.0.self_attn.q_proj.weight" in ours
    assert "model.layers.0.self_attn.k_proj.weight" in ours
    assert ours["model.embed_tokens.weight"].shape == (49152, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    parsed = load_gguf_checkpoint(str(bundled.path))
    cfg = transformers.AutoConfig.for_model(**parsed["config"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    processor = LlamaTensorProcessor(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)
    for tensor in itertools.islice(open_gguf(bundled.path).tensors, 10):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        theirs = processor.process(weights=values, name=tensor.name).weights
        hf_name = names[tensor.name]
        assert torch.equal(torch.from_numpy(np.array(theirs)), ours[hf_name]), hf_name
