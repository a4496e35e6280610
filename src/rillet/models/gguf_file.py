"""A GGUF file's metadata and tensor table, parsed straight from a memory map.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value: the 151,936
tokens and 151,387 merges of Qwen2.5's vocabulary alone took 8-10 s of every start
(SmolLM2's 49,152 tokens: 3 s). The same walk with ``struct`` over the mapped bytes takes a
fraction of a second. Values come out as ``GGUFReader``'s ``field.contents()`` gives them
(str, int, float, bool, lists of those), and each tensor's ``data`` is the same view of the
map, with the same dtype and shape, so ``gguf.quants.dequantize`` takes it as it is.

Format (llama.cpp's ``docs/gguf.md``): magic ``GGUF``, version (2 or 3), tensor count,
metadata count, the metadata (key, type, value), the tensor table (name, dims fastest
first, type, offset), then the data, aligned to ``general.alignment`` (default 32).
Little-endian only: big-endian GGUF files are refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_STRING, _ARRAY = 8, 9
#: Scalar value types: struct format and numpy dtype.
_SCALARS: dict[int, tuple[str, type[np.generic]]] = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
#: Tensor types whose data is typed elements, as GGUFReader exposes them; others are bytes.
_ELEMENT_DTYPES: dict[GGMLQuantizationType, type[np.generic]] = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
_DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: ``shape`` lists dimensions fastest first (GGUF's ``ne``), ``data`` is
    the mapped bytes in C order (HF's ``[out, in]``): typed elements for float and integer
    types, ``[..., bytes per row]`` uint8 for block-quantized ones."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    data: np.ndarray


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file; ``data`` views keep the memory map alive."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


def read_gguf(path: Path) -> GGUFFile:
    """Parse ``path``; raises ValueError (or struct.error, IndexError) on a malformed file."""
    raw = np.memmap(path, mode="r")
    buf = memoryview(raw)  # type: ignore[arg-type]  # struct reads it without copying the file
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    version, n_tensors, n_meta = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        swapped = version.to_bytes(4, "little")[::-1]
        if int.from_bytes(swapped, "little") in (2, 3):
            raise ValueError("big-endian GGUF files are not supported")
        raise ValueError(f"unsupported GGUF version {version}")
    reader = _Cursor(buf, 24)
    metadata: dict[str, Any] = {}
    for _ in range(n_meta):
        key = reader.string()
        if key in metadata:
            raise ValueError(f"duplicate metadata key {key!r}")
        metadata[key] = reader.value(reader.u32())
    table = []
    for _ in range(n_tensors):
        name = reader.string()
        dims = struct.unpack_from(f"<{reader.u32()}Q", buf, reader.at)
        reader.at += 8 * len(dims)
        tensor_type, offset = struct.unpack_from("<IQ", buf, reader.at)
        reader.at += 12
        table.append((name, dims, GGMLQuantizationType(tensor_type), offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"invalid general.alignment {alignment!r}")
    start = -(-reader.at // alignment) * alignment
    names = {entry[0] for entry in table}
    if len(names) != len(table):
        raise ValueError("duplicate tensor names")
    return GGUFFile(metadata, [_tensor(raw, start, *entry) for entry in table])


def _tensor(
    raw: np.ndarray,
    start: int,
    name: str,
    dims: tuple[int, ...],
    qtype: GGMLQuantizationType,
    offset: int,
) -> GGUFTensor:
    n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(reversed(dims))
    dtype = _ELEMENT_DTYPES.get(qtype)
    if dtype is None:  # blocks: bytes, a row's blocks in the last dimension
        if shape[-1] % block_size:
            raise ValueError(f"tensor {name!r}: rows are not whole {qtype.name} blocks")
        shape = (*shape[:-1], shape[-1] // block_size * type_size)
        dtype = np.uint8
    n_bytes = n_elements * type_size // block_size
    begin = start + offset
    if begin + n_bytes > raw.size:
        raise ValueError(f"tensor {name!r} runs past the end of the file")
    data = raw[begin : begin + n_bytes].view(dtype).reshape(shape)
    return GGUFTensor(name, qtype, tuple(int(d) for d in dims), n_elements, data)


class _Cursor:
    """Reads metadata values at ``at``, advancing past each."""

    def __init__(self, buf: memoryview, at: int) -> None:
        self.buf = buf
        self.at = at

    def u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.buf, self.at)
        self.at += 4
        return int(value)

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buf, self.at)
        start = self.at + 8
        self.at = start + length
        if self.at > len(self.buf):
            raise ValueError("string runs past the end of the file")
        return str(self.buf[start : self.at], "utf-8")

    def _strings(self, count: int) -> list[str]:
        """``count`` strings in a row: a vocabulary's 150k tokens, so the loop is tight."""
        buf, at, end = self.buf, self.at, len(self.buf)
        length_at = _U64.unpack_from
        out = []
        for _ in range(count):
            (length,) = length_at(buf, at)
            at += 8 + length
            if at > end:
                raise ValueError("string runs past the end of the file")
            out.append(str(buf[at - length : at], "utf-8"))
        self.at = at
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind = self.u32()
            (count,) = struct.unpack_from("<Q", self.buf, self.at)
            self.at += 8
            if item_kind in _SCALARS:  # one numpy read for the whole array
                dtype = np.dtype(_SCALARS[item_kind][1])
                end = self.at + count * dtype.itemsize
                if end > len(self.buf):
                    raise ValueError("array runs past the end of the file")
                values = np.frombuffer(self.buf, dtype, count, self.at).tolist()
                self.at = end
                return values
            if item_kind == _STRING:
                return self._strings(count)
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        fmt = _SCALARS[kind][0]
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value
