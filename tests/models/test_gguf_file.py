"""rillet.models.gguf_file: the same metadata and tensor views as gguf.GGUFReader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from rillet.models import resolve_model_path
from rillet.models.gguf_file import GGUFFile, GGUFTensor, read_gguf
from rillet.models.gguf_weights import dequantize_tensor


def reader_view(path: Path) -> tuple[dict[str, Any], gguf.GGUFReader]:
    """GGUFReader's metadata values (without its own GGUF.* header fields) and the reader."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, reader


def assert_same(ours: GGUFFile, path: Path) -> None:
    meta, reader = reader_view(path)
    assert ours.metadata == meta
    assert [type(v) for v in ours.metadata.values()] == [type(v) for v in meta.values()]
    assert len(ours.tensors) == len(reader.tensors)
    for mine, theirs in zip(ours.tensors, reader.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.n_elements) == (
            theirs.name,
            theirs.tensor_type,
            theirs.n_elements,
        )
        assert list(mine.shape) == theirs.shape.tolist()
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert np.array_equal(mine.data, theirs.data), mine.name


def write_every_kind(path: Path) -> None:
    """A file with every metadata value type and tensors of several storage types."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.strs", ["a", "", "日本", "<|im_end|>"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.25])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    for name, qtype in (("f32", Q.F32), ("f16", Q.F16), ("bf16", Q.BF16), ("q4", Q.Q4_1)):
        data = rng.standard_normal((4, 64)).astype(np.float32)
        raw = data.astype(np.float16) if qtype == Q.F16 else data
        if qtype in (Q.BF16, Q.Q4_1):
            raw = quantize(data, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype if qtype in (Q.BF16, Q.Q4_1) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_every_value_type_and_tensor_kind(tmp_path: Path) -> None:
    path = tmp_path / "kinds.gguf"
    write_every_kind(path)
    ours = read_gguf(path)
    assert_same(ours, path)
    assert ours.metadata["t.strs"] == ["a", "", "日本", "<|im_end|>"]
    assert ours.metadata["t.u64"] == 2**63 + 5 and ours.metadata["t.bool"] is True


def test_bundled_model_reads_as_gguf_reader_reads_it() -> None:
    path = resolve_model_path(None)
    assert_same(read_gguf(path), path)


@pytest.mark.parametrize("cut", [3, 10, 30, 2000, -100])
def test_truncated_files_raise(tmp_path: Path, cut: int) -> None:
    write_every_kind(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(Exception):  # noqa: B017 -- any error; the loader words it
        read_gguf(tmp_path / "cut.gguf")


def test_big_endian_and_bad_magic_are_refused(tmp_path: Path) -> None:
    (tmp_path / "be.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))
    with pytest.raises(ValueError, match="big-endian"):
        read_gguf(tmp_path / "be.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="magic"):
        read_gguf(tmp_path / "junk.gguf")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q5_0])
def test_dequantize_in_slabs_is_gguf_dequantize(qtype: Q) -> None:
    # More rows than one slab holds, and a row count that does not divide into slabs.
    values = np.random.default_rng(1).standard_normal((3001, 512)).astype(np.float32)
    raw = quantize(values, qtype)
    tensor = GGUFTensor("t", qtype, (512, 3001), values.size, raw)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(dequantize_tensor(tensor), expected)
