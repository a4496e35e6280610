"""The weight cache (rillet.models.weight_cache, through engine.model_setup): a hit maps
exactly the tensors a fresh build makes; a changed file or option misses; a corrupt entry
is rebuilt, never fatal; RILLET_WEIGHT_CACHE=0 turns it off; old entries are pruned."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from rillet.config import EngineConfig
from rillet.engine.model_setup import ReadyModel, prepare_model
from rillet.llm import LLM
from rillet.models import load_model_files, weight_cache
from rillet.models.linear import Linear
from rillet.sampling import SamplingParams

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
# Byte-level tokens (as tests/test_loader.py) and an embedding padded to 272 rows, a whole
# number of the quantized kernel's 16-row blocks.
TOKENS = [chr(c) for c in range(33, 127)] + [chr(c) for c in (*range(161, 173), *range(174, 256))]
TOKENS += [chr(256 + i) for i in range(256 - len(TOKENS))] + ["<|endoftext|>", "<|im_end|>"]
VOCAB = 272
# Codes for some matrices (Q4_1: 4 bits, Q8_0: 8 bits), floats for others, and a fused q/k/v
# with both, so every path of a fresh build runs: skipped floats, partial re-quantization.
QTYPES = {"attn_q": Q.Q4_1, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1}
QTYPES |= {"ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.F32}
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
PROMPTS = ["hello there", "abc abc abc"]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama GGUF with a tied Q8_0 embedding and mixed matrix formats."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_token_merges([])
    writer.add_eos_token_id(257)

    def add(name: str, shape: tuple[int, ...], qtype: Q = Q.F32) -> None:
        data = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    head = HIDDEN // HEADS
    add("token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0)
    add("output_norm.weight", (HIDDEN,))
    for i in range(LAYERS):
        shapes = {
            "attn_q": (HIDDEN, HIDDEN),
            "attn_k": (KV_HEADS * head, HIDDEN),
            "attn_v": (KV_HEADS * head, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN),
            "ffn_gate": (FFN, HIDDEN),
            "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN),
        }
        for part, shape in shapes.items():
            add(f"blk.{i}.{part}.weight", shape, QTYPES[part])
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def options(**overrides: object) -> dict[str, object]:
    """Quantized copies for every step (the tiny file has float layers, so not by default)."""
    return {"dtype": "bfloat16", "quantized_max_batch_tokens": 512, **overrides}


def ready(path: Path, root: Path, native: ModuleType, **overrides: object) -> ReadyModel:
    config = EngineConfig(model=str(path), **options(**overrides))  # type: ignore[arg-type]
    files = load_model_files(config.model)
    prepared = prepare_model(files, config, torch.device("cpu"), torch.bfloat16, native, root)
    weight_cache.wait_for_writes()  # the entry is written in the background
    return prepared


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every value a ready model serves from: parameters (meta ones as their shape) and
    quantized copies, with their bits."""
    out = {}
    for name, param in model.named_parameters():
        out[name] = param.detach() if param.device.type != "meta" else torch.tensor(param.shape)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.quantized_weight is not None:
            out[f"{name}.quantized"] = module.quantized_weight
            out[f"{name}.bits"] = torch.tensor(module.quantized_bits)
    return out


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ours, theirs = model_tensors(a), model_tensors(b)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


def test_a_hit_maps_what_a_fresh_build_makes(
    tiny_gguf: Path, tmp_path: Path, native: ModuleType
) -> None:
    root = tmp_path / "cache"
    fresh = ready(tiny_gguf, root, native, weight_cache=False)
    assert not root.exists()  # off: nothing written
    first = ready(tiny_gguf, root, native)
    second = ready(tiny_gguf, root, native)
    assert (first.cached, second.cached) == (False, True)
    assert second.quantized_layers == first.quantized_layers == fresh.quantized_layers > 0
    assert_same_tensors(fresh.model, second.model)
    assert_same_tensors(first.model, second.model)
    # The layers whose every row had codes never had their floats read, and keep none.
    layer = second.model.layers[0]
    assert layer.mlp.gate_up_proj.weight.device.type == "meta"  # Q4_1 + Q4_1
    assert layer.self_attn.qkv_proj.weight.device.type == "meta"  # Q4_1 + F16 + Q8_0
    assert second.model.lm_head.weight is second.model.embed_tokens.weight  # still tied
    assert second.model.embed_tokens.weight.device.type == "cpu"
    for a, b in zip(fresh.model.modules(), second.model.modules(), strict=True):
        if isinstance(a, Linear):
            x = torch.randn(3, a.in_features).bfloat16()
            assert isinstance(b, Linear) and torch.equal(a.forward(x), b.forward(x))


def test_greedy_outputs_identical_with_and_without_the_cache(
    tiny_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("RILLET_CACHE_DIR", str(tmp_path / "rillet"))
    caplog.set_level(logging.INFO, logger="rillet.engine")
    outputs = []
    for cache in (False, True, True):
        llm = LLM(str(tiny_gguf), weight_cache=cache, **options())
        weight_cache.wait_for_writes()
        outputs.append([c.token_ids for c in llm.generate(PROMPTS, GREEDY)])
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0][0]) == GREEDY.max_new_tokens
    assert sum("weights mapped from the cache" in r.message for r in caplog.records) == 1


def test_the_bundled_model_from_the_cache_is_the_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RILLET_CACHE_DIR", str(tmp_path / "rillet"))
    fresh = LLM(weight_cache=False)
    LLM()  # writes the entry
    weight_cache.wait_for_writes()
    cached = LLM()
    assert_same_tensors(fresh.core.runner.model, cached.core.runner.model)
    assert [c.token_ids for c in fresh.generate(PROMPTS, GREEDY)] == [
        c.token_ids for c in cached.generate(PROMPTS, GREEDY)
    ]


def test_a_changed_file_or_option_misses(
    tiny_gguf: Path, tmp_path: Path, native: ModuleType
) -> None:
    root = tmp_path / "cache"
    ready(tiny_gguf, root, native)
    assert ready(tiny_gguf, root, native).cached
    assert not ready(tiny_gguf, root, native, max_num_batched_tokens=256).cached
    assert not ready(tiny_gguf, root, native, quantized_max_batch_tokens=0).cached
    # Rewritten with other values (a new mtime): a miss, and the new values.
    stat = tiny_gguf.stat()
    write_tiny_gguf(tiny_gguf, seed=1)
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = ready(tiny_gguf, root, native)
    assert not changed.cached
    assert_same_tensors(changed.model, ready(tiny_gguf, root, native, weight_cache=False).model)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong shapes"])
def test_a_corrupt_entry_is_rebuilt(
    tiny_gguf: Path, tmp_path: Path, native: ModuleType, damage: str
) -> None:
    root = tmp_path / "cache"
    fresh = ready(tiny_gguf, root, native)
    (entry,) = root.glob("*/*.pt")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00not a zip" * 1000)
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a well-formed entry under the right key whose tensors do not fit the model
        saved = torch.load(entry, weights_only=True)
        saved["params"]["norm.weight"] = torch.zeros(HIDDEN + 1, dtype=torch.bfloat16)
        torch.save(saved, entry)
    rebuilt = ready(tiny_gguf, root, native)
    assert not rebuilt.cached
    assert_same_tensors(fresh.model, rebuilt.model)
    again = ready(tiny_gguf, root, native)  # the rebuild wrote a good entry back
    assert again.cached
    assert_same_tensors(fresh.model, again.model)


def test_the_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RILLET_WEIGHT_CACHE", "0")
    assert EngineConfig.from_env().weight_cache is False
    monkeypatch.setenv("RILLET_WEIGHT_CACHE", "1")
    assert EngineConfig.from_env().weight_cache is True
    monkeypatch.delenv("RILLET_WEIGHT_CACHE")
    assert EngineConfig.from_env().weight_cache is True


def test_a_layer_whose_probe_fails_gets_its_floats(
    tiny_gguf: Path, tmp_path: Path, native: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = ready(tiny_gguf, tmp_path / "a", native, quantized_max_batch_tokens=0)
    original = Linear.enable_quantized

    def failing_gate_up(self: Linear, bits: int, max_rows: int, native: ModuleType) -> bool:
        if self.out_features == 2 * FFN:  # gate_up: every row has codes, floats skipped
            self.source_codes = None
            return False
        return original(self, bits, max_rows, native)

    monkeypatch.setattr(Linear, "enable_quantized", failing_gate_up)
    got = ready(tiny_gguf, tmp_path / "b", native, weight_cache=False)
    for i in range(LAYERS):
        layer, expected = got.model.layers[i].mlp, reference.model.layers[i].mlp
        assert layer.gate_up_proj.quantized_weight is None
        assert torch.equal(layer.gate_up_proj.weight, expected.gate_up_proj.weight)
        assert layer.down_proj.weight.device.type == "meta"  # it took its copy


def test_prune_keeps_the_newest_entries_per_model(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    entry = weight_cache.Entry({"w": torch.zeros(2)}, {}, [])
    paths = []
    for i in range(4):
        key = weight_cache.cache_key([model], {"option": i})
        path = weight_cache.save(root, key, entry)
        assert path is not None
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # save order = age order
        paths.append(path)
    weight_cache.prune(root)
    assert sorted(p.exists() for p in paths) == [False, False, True, True]
    assert paths[3].exists() and paths[2].exists()
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(b"y")
    gone_path = weight_cache.save(root, weight_cache.cache_key([gone], {}), entry)
    assert gone_path is not None and gone_path.exists()
    gone.unlink()
    weight_cache.prune(root)
    assert not gone_path.parent.exists() and paths[3].exists()
