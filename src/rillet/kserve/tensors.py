"""KServe v2 tensors as Python values, both ways, as tritonclient lays them out.

Raw contents are little-endian and row-major; a BOOL is one byte; a BYTES element is a
4-byte little-endian length and then its bytes (``tritonclient.utils.serialize_byte_tensor``).
tritonclient always sends raw inputs and reads raw outputs first; typed ``contents`` are
accepted too. Only the datatypes an LLM's tensors use are decoded: BYTES, BOOL, the
integers and the floats.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

from rillet.errors import ValidationError

_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP32": "f",
    "FP64": "d",
}
_CONTENT_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in raw form: each is ``<u32 length><bytes>``."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def unpack_bytes(raw: bytes) -> list[bytes]:
    """The inverse of :func:`pack_bytes`; ValidationError if ``raw`` is not that."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValidationError("a BYTES tensor ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ValidationError("a BYTES tensor element is longer than the tensor")
        items.append(bytes(raw[offset : offset + size]))
        offset += size
    return items


def num_elements(shape: Sequence[int]) -> int:
    if any(dim < 0 for dim in shape):
        raise ValidationError(f"a tensor's shape cannot be negative: {list(shape)}")
    return math.prod(shape)


def decode(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | None, contents: Any
) -> list[Any]:
    """A tensor's elements, flattened. ``raw`` wins over ``contents`` (the message's typed
    ``InferTensorContents``). The element count must match the shape."""
    if datatype not in _CONTENT_FIELDS:
        raise ValidationError(f"input {name!r}: datatype {datatype!r} is not supported here")
    if raw is not None:
        if datatype == "BYTES":
            values: list[Any] = unpack_bytes(raw)
        else:
            fmt = _FORMATS[datatype]
            size = struct.calcsize(fmt)
            if len(raw) % size:
                raise ValidationError(
                    f"input {name!r}: {len(raw)} bytes is not a whole number of {datatype}"
                )
            values = list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))
    else:
        values = list(getattr(contents, _CONTENT_FIELDS[datatype])) if contents is not None else []
    expected = num_elements(shape)
    if len(values) != expected:
        raise ValidationError(
            f"input {name!r}: shape {list(shape)} needs {expected} element(s), got {len(values)}"
        )
    return values


def encode(datatype: str, values: Sequence[Any]) -> bytes:
    """Raw contents of a one-dimensional tensor of ``values``."""
    if datatype == "BYTES":
        return pack_bytes([v if isinstance(v, bytes) else str(v).encode() for v in values])
    fmt = _FORMATS[datatype]
    return struct.pack(f"<{len(values)}{fmt}", *values)
