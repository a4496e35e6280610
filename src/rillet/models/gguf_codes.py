"""A GGUF tensor's own integers as the integer kernel's groups of 32 (``group_quantization``).

The kernel stores every group of 32 inputs of an output row as ``w = d * u + m``: unsigned
integers ``u`` (4 or 8 bits) with an fp16 scale ``d`` and offset ``m``. Most of llama.cpp's
formats are that shape already, so a file's weights can go to the kernel as the file has
them, instead of being dequantized and quantized again (which finds the file's grid only
when a group's codes happen to reach both 0 and 15):

======  ====  ======================  ===========================  =====================
type    bits  u                       d                            m
======  ====  ======================  ===========================  =====================
Q4_0    4     q (0..15)               d                            -8 d
Q4_1    4     q                       d                            m
Q4_K    4     q of the sub-block      fp16(d x scale)              fp16(-dmin x min)
Q5_0    8     q (0..31)               d                            -16 d
Q5_1    8     q                       d                            m
Q5_K    8     q of the sub-block      fp16(d x scale)              fp16(-dmin x min)
Q8_0    8     q + 128                 d                            -128 d
Q6_K    6     q (0..63)               fp16(d x scale), per 16      -32 d, per 16
======  ====  ======================  ===========================  =====================

Q4_0/1, Q5_0/1 and Q8_0 map exactly (-8 d, -16 d and -128 d are exact in fp16). A K-quant
super-block of 256 holds eight sub-blocks of 32, each with a 6-bit scale and min under the
super-block's fp16 ``d`` and ``dmin``: exactly a group with a scale and an offset, whose only
change is the fp16 rounding of the two products (``tests/models/test_gguf_codes.py`` bounds it;
``bench/quantization_check.py`` measures what it does to a model). Q5 codes go to the 8-bit
mode, whose ``u`` is any byte. Q6_K (sub-blocks of 16 with int8 scales, symmetric) keeps its
width in the kernel's 6-bit mode, whose ``d`` and ``m`` are per 16 inputs: 7 bits a weight
read against the 8-bit mode's 9, and Q4_K_M files keep their LM head and about half of
their ``ffn_down`` matrices in Q6_K. Formats without such a shape (Q2_K, Q3_K, the IQ
types) have no codes here: the loader quantizes their float values again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rillet.models.group_quantization import GROUP, scales_per_group

Q = GGMLQuantizationType

#: Types with codes, and the kernel width they run at.
CODE_BITS: dict[Q, int] = {
    Q.Q4_0: 4,
    Q.Q4_1: 4,
    Q.Q4_K: 4,
    Q.Q5_0: 8,
    Q.Q5_1: 8,
    Q.Q5_K: 8,
    Q.Q8_0: 8,
    Q.Q6_K: 6,
}


@dataclass(frozen=True)
class KScales:
    """Q4_K's own two levels of scale: per super-block of 256 an fp16 ``d`` and ``dmin``,
    per group of 32 a 6-bit scale and min; a group's ``d`` is ``d * scale`` and its ``m``
    is ``-dmin * min``. The kernel's mode 41 reads them as they are (4.625 bits a weight
    against 5 with an fp16 ``d`` and ``m`` per group)."""

    d: torch.Tensor  # [N, K/256] fp16
    neg_dmin: torch.Tensor  # [N, K/256] fp16: -dmin
    scale: torch.Tensor  # [N, K/32] uint8
    min: torch.Tensor  # [N, K/32] uint8

    def rows(self, permutation: torch.Tensor) -> KScales:
        p = permutation
        return KScales(self.d[p], self.neg_dmin[p], self.scale[p], self.min[p])


@dataclass(frozen=True)
class GroupCodes:
    """A ``[N, K]`` weight as ``w = d * u + m`` per group of 32 (``group_quantization``)."""

    u: torch.Tensor  # [N, K/32, 32] uint8
    d: torch.Tensor  # [N, K/32] fp16 ([N, K/16] with 6 bits)
    m: torch.Tensor  # as d
    bits: int
    #: Q4_K's scales before their product was rounded to fp16 (None for other types).
    k_scales: KScales | None = None

    def rows(self, permutation: torch.Tensor) -> GroupCodes:
        """The same codes with output rows reordered (``permutation[i]`` is new row i)."""
        k_scales = None if self.k_scales is None else self.k_scales.rows(permutation)
        return GroupCodes(
            self.u[permutation], self.d[permutation], self.m[permutation], self.bits, k_scales
        )


def group_codes(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> GroupCodes | None:
    """The codes of one 2-D tensor's raw blocks (``ReaderTensor.data``), HF shape ``[N, K]``;
    None for a type without codes or values fp16 cannot hold."""
    if qtype not in CODE_BITS or shape[1] % GROUP:
        return None
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    n, k = shape
    groups = n * k // GROUP
    per_block = block_size // GROUP
    scales = scales_per_group(CODE_BITS[qtype])
    u = np.empty((groups, GROUP), dtype=np.uint8)
    d = np.empty(groups * scales, dtype=np.float16)
    m = np.empty(groups * scales, dtype=np.float16)
    # A slab of blocks at a time: the decoders' temporaries stay in the cache (a whole
    # 1.5B model's matrices decoded ~2x faster than in one go per tensor).
    for start in range(0, blocks.shape[0], _BLOCKS_AT_ONCE):
        part = slice(start * per_block, (start + _BLOCKS_AT_ONCE) * per_block)
        both = slice(part.start * scales, part.stop * scales)
        u[part], d[both], m[both] = _DECODERS[qtype](blocks[start : start + _BLOCKS_AT_ONCE])
    if not (np.isfinite(d).all() and np.isfinite(m).all()):
        return None
    return GroupCodes(
        u=torch.from_numpy(u.reshape(n, k // GROUP, GROUP)),
        d=torch.from_numpy(d.reshape(n, k // GROUP * scales)),
        m=torch.from_numpy(m.reshape(n, k // GROUP * scales)),
        bits=CODE_BITS[qtype],
        k_scales=_q4_k_scales(blocks, n, k) if qtype == Q.Q4_K else None,
    )


def _q4_k_scales(blocks: np.ndarray, n: int, k: int) -> KScales:
    """The two levels of scale of Q4_K blocks ([B, 144]) of an ``[n, k]`` matrix."""
    scale, low = _k_scale_bytes(blocks)
    super_blocks = k // 256
    return KScales(
        d=torch.from_numpy(_half(blocks, 0).copy().reshape(n, super_blocks)),
        neg_dmin=torch.from_numpy((-_half(blocks, 2)).reshape(n, super_blocks)),
        scale=torch.from_numpy(scale.reshape(n, k // GROUP).copy()),
        min=torch.from_numpy(low.reshape(n, k // GROUP).copy()),
    )


#: Blocks decoded at a time.
_BLOCKS_AT_ONCE = 4096


Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # u [G, 32] uint8, d and m [G] fp16


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of every block, as float16 [B]."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[B, 16] bytes -> [B, 32] codes: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[B, 4] bytes (a little-endian uint32) -> [B, 32] bit i of element i, shifted to 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return (bits << 4).astype(np.uint8)


def _q4_0(b: np.ndarray) -> Decoded:
    d = _half(b, 0)
    return _nibbles(b[:, 2:18]), d, (d * np.float16(-8)).astype(np.float16)


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:20]), _half(b, 0), _half(b, 2)


def _q5_0(b: np.ndarray) -> Decoded:
    d = _half(b, 0)
    u = _nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6])
    return u, d, (d * np.float16(-16)).astype(np.float16)


def _q5_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8]), _half(b, 0), _half(b, 2)


def _q8_0(b: np.ndarray) -> Decoded:
    d = _half(b, 0)
    u = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return u, d, (d * np.float16(-128)).astype(np.float16)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_K/Q5_K super-block's eight sub-block (d, m) in fp16: bytes 0-3 d and dmin, then
    12 bytes of 6-bit scales and mins (sub-blocks 0-3 in the low six bits of bytes 0-3 and
    4-7; 4-7 in the nibbles of bytes 8-11 with their top two bits in the bytes' top bits)."""
    sc, mn = _k_scale_bytes(b)
    d = _half(b, 0).astype(np.float32)[:, None] * sc.astype(np.float32)
    m = -_half(b, 2).astype(np.float32)[:, None] * mn.astype(np.float32)
    return d.astype(np.float16).reshape(-1), m.astype(np.float16).reshape(-1)


def _k_scale_bytes(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K super-blocks, as [B, 8] bytes each."""
    scales = b[:, 4:16].reshape(-1, 3, 4)
    low, mid, high = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[B, 128] bytes -> [B, 8, 32]: 32 bytes per pair of sub-blocks, the first sub-block in
    the low nibbles, the second in the high ones."""
    pairs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([pairs & 0x0F, pairs >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray) -> Decoded:
    d, m = _k_scales(b)
    return _k_low_nibbles(b[:, 16:144]).reshape(-1, 32), d, m


def _q5_k(b: np.ndarray) -> Decoded:
    d, m = _k_scales(b)
    qh = b[:, 16:48].reshape(-1, 1, 32)  # bit j of byte l: element l of sub-block j
    fifth = ((qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 4
    return (_k_low_nibbles(b[:, 48:176]) | fifth).reshape(-1, 32), d, m


def _q6_k(b: np.ndarray) -> Decoded:
    """A Q6_K super-block (ql[128], qh[64], int8 scales[16], fp16 d) -> 8 groups of 32 codes
    (0..63) and 16 scales: per half of 128, element 32k + l (k = 0..3) has the low nibble of
    ql[l] (k = 0, 2: low, high) or ql[32 + l] (k = 1, 3) and bits 2k..2k+1 of qh[l]."""
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [B, half, k, 32]
    top = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    u = (low | (top << 4)).reshape(-1, 32)
    scale = b[:, 192:208].view(np.int8).astype(np.float32)
    d = (_half(b, 208).astype(np.float32)[:, None] * scale).astype(np.float16).reshape(-1)
    return u, d, (d * np.float16(-32)).astype(np.float16)


_DECODERS = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q4_K: _q4_k,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q5_K: _q5_k,
    Q.Q8_0: _q8_0,
    Q.Q6_K: _q6_k,
}
