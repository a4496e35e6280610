"""4- and 8-bit weights in groups of 32 inputs, in the layout ``csrc/quantized_linear.cpp``
reads.

Every group of 32 consecutive inputs of an output row is stored as unsigned integers ``u``
with an fp16 scale ``d`` and offset ``m``: ``w = d * u + m``.

- 4-bit: ``u`` in 0..15 spanning the group's min..max; llama.cpp's Q4_1, the format of
  the bundled model's decoder layers. Quantizing weights that were dequantized from Q4_1
  gives back the file's own numbers (up to the bf16 rounding of the loaded weights).
- 8-bit: symmetric, ``u - 128`` in -127..127 scaled by the group's largest magnitude
  (``m = -128 d``); llama.cpp's Q8_0, the format of the bundled model's embedding (tied to
  its LM head).

- 6-bit: llama.cpp's Q6_K as the file has it, ``u`` in 0..63 with a scale per 16 inputs
  (``d`` holds two per group) and ``m = -32 d``. Only a file's codes take it
  (``gguf_codes``); :func:`quantize` makes 4 and 8 bits.

:func:`dequantize` is the exact inverse of the stored numbers; tests use it as the reference.
"""

from __future__ import annotations

import torch

#: Inputs per quantization group.
GROUP = 32
#: Output columns per packed block: one zmm of fp32 lanes.
LANES = 16


def record_bytes(bits: int) -> int:
    """Bytes of one (16 columns x 32 inputs) record: the integers, then d and m as fp16
    (6 bits: the two halves' d)."""
    return bits * GROUP * LANES // 8 + 2 * LANES * 2


#: The kernel mode of Q4_K's own scales (``gguf_codes.KScales``): 4-bit codes, and per
#: super-block of 256 inputs an fp16 d and -dmin per column over a byte scale and min per
#: group.
K4 = 41
#: Bytes of one mode-41 super-record (16 columns x 256 inputs): 8 groups' 4-bit lines, the
#: scales and mins as bytes, d and -dmin as fp16.
K4_SUPER_RECORD = 8 * 256 + 2 * 8 * LANES + 2 * LANES * 2


def scales_per_group(bits: int) -> int:
    """How many (d, m) pairs a group of 32 has: two for 6 bits (Q6_K's 16), else one."""
    return 2 if bits == 6 else 1


def supports(weight: torch.Tensor) -> bool:
    """Whether a ``[N, K]`` weight has the shape the packed layout needs."""
    n, k = weight.shape
    return n % LANES == 0 and k % GROUP == 0


#: Rows quantized at a time: every step below makes an fp32 temporary of its rows, and rows
#: that stay in the cache between steps made a 1.5B model's 8-bit layers 3x faster.
_ROWS_AT_ONCE = 64


@torch.no_grad()
def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, K]`` float weight -> (``u`` [N, K/32, 32] uint8, ``d`` and ``m`` [N, K/32] fp16)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    n, k = weight.shape
    u = torch.empty(n, k // GROUP, GROUP, dtype=torch.uint8, device=weight.device)
    d = torch.empty(n, k // GROUP, dtype=torch.float16, device=weight.device)
    m = torch.empty_like(d)
    for start in range(0, n, _ROWS_AT_ONCE):
        rows = slice(start, start + _ROWS_AT_ONCE)  # each row's numbers are its own
        u[rows], d[rows], m[rows] = _quantize_rows(weight[rows], bits)
    return u, d, m


def _quantize_rows(
    weight: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    if bits == 4:
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        d = ((high - low) / 15).half()
        m = low.half()
        top = 15
    else:
        d = (groups.abs().amax(dim=-1) / 127).half()
        m = (-128 * d.float()).half()  # exact: a power-of-two multiple of an fp16 number
        top = 255
    # Round against the stored (fp16) d and m, so the error is that of the stored numbers.
    d32, m32 = d.float()[..., None], m.float()[..., None]
    u = torch.where(d32 > 0, (groups - m32) / d32.clamp(min=torch.finfo(torch.float32).tiny), 0)
    return u.round().clamp(0, top).to(torch.uint8), d, m


def dequantize(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 ``[N, K]`` weight that (u, d, m) stand for; ``d`` and ``m`` have one value
    per group of 32 ([N, K/32]) or, with 6 bits, per 16 ([N, K/16])."""
    n = u.shape[0]
    pieces = u.float().reshape(n, d.shape[1], -1)
    w = pieces * d.float()[..., None] + m.float()[..., None]
    return w.reshape(n, -1)


def pack(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """(u, d, m) from :func:`quantize` -> ``[N/16, K/32, record_bytes(bits)]`` uint8.

    Within a record, line t (64 bytes) holds 4 consecutive inputs for each of the 16
    columns, column-major (vpdpbusd's operand order); with 4 bits, the low nibbles hold
    inputs 8t..8t+3 and the high nibbles 8t+4..8t+7.
    """
    n, g, _ = u.shape
    if bits == 6:
        return _pack6(u, d)
    blocks = u.reshape(n // LANES, LANES, g, GROUP).permute(0, 2, 1, 3)  # [B, G, col, 32]
    if bits == 8:
        # [B, G, col, t, j] -> [B, G, t, col, j]
        lines = blocks.reshape(n // LANES, g, LANES, 8, 4).permute(0, 1, 3, 2, 4)
    else:
        # [B, G, col, t, half, j] -> [B, G, t, col, half, j]
        halves = blocks.reshape(n // LANES, g, LANES, 4, 2, 4).permute(0, 1, 3, 2, 4, 5)
        lines = halves[..., 0, :] | (halves[..., 1, :] << 4)
    payload = lines.reshape(n // LANES, g, -1)
    d_bytes = d.reshape(n // LANES, LANES, g).permute(0, 2, 1).contiguous().view(torch.uint8)
    m_bytes = m.reshape(n // LANES, LANES, g).permute(0, 2, 1).contiguous().view(torch.uint8)
    return torch.cat([payload, d_bytes, m_bytes], dim=-1).contiguous()


def _pack6(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The 6-bit record (``csrc/quantized_linear.cpp``): the low nibbles as :func:`pack`'s
    4-bit lines, then two lines of top bits (line h byte 4i + j, bits 2k..2k+1: input
    16h + 4k + j of column i), then d of each half for the 16 columns (``m`` is -32 d)."""
    n, g, _ = u.shape
    low = pack(u & 0x0F, d[:, ::2], d[:, ::2], 4)[..., : 4 * 64]
    top = (u >> 4).reshape(n // LANES, LANES, g, 2, 4, 4)  # [B, col, G, h, k, j]
    fields = top.permute(0, 2, 3, 1, 5, 4)  # [B, G, h, col, j, k]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    top_lines = (fields << shifts).sum(dim=-1, dtype=torch.uint8).reshape(n // LANES, g, -1)
    halves = d.reshape(n // LANES, LANES, g, 2).permute(0, 2, 3, 1).contiguous()
    d_bytes = halves.view(torch.uint8).reshape(n // LANES, g, -1)
    return torch.cat([low, top_lines, d_bytes], dim=-1).contiguous()


def pack_k4(
    u: torch.Tensor, d: torch.Tensor, neg_dmin: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
) -> torch.Tensor:
    """Mode 41 (``csrc/quantized_linear.cpp``): ``u`` [N, K/32, 32] 4-bit codes, ``d`` and
    ``neg_dmin`` [N, K/256] fp16, ``scale`` and ``low`` [N, K/32] bytes ->
    ``[N/16, K/256, K4_SUPER_RECORD]`` uint8: the 8 groups' 4-bit lines, the scales as
    [group][column] bytes, the mins as [group pair][column][2] bytes, d and -dmin."""
    n, g, _ = u.shape
    blocks, supers = n // LANES, g // 8
    lines = pack(u, d.new_zeros(n, g), d.new_zeros(n, g), 4)[..., : 4 * 64]
    payload = lines.reshape(blocks, supers, 8 * 256)

    def per_group(t: torch.Tensor) -> torch.Tensor:  # [N, G] bytes -> [B, S, 8 x 16]
        return t.reshape(blocks, LANES, supers, 8).permute(0, 2, 3, 1).reshape(blocks, supers, -1)

    def in_pairs(t: torch.Tensor) -> torch.Tensor:  # [N, G] bytes -> [B, S, 4 x 16 x 2]
        # Byte 32j + 2i + p: group 2j + p of column i, so widening 32 bytes to int16 gives
        # each column's lane the pair vpdpwssd multiplies by groups 2j, 2j + 1's input sums.
        pairs = t.reshape(blocks, LANES, supers, 4, 2).permute(0, 2, 3, 1, 4)
        return pairs.reshape(blocks, supers, -1)

    def per_super(t: torch.Tensor) -> torch.Tensor:  # [N, S] fp16 -> [B, S, 16 x 2] bytes
        lanes = t.reshape(blocks, LANES, supers).permute(0, 2, 1).contiguous()
        return lanes.view(torch.uint8).reshape(blocks, supers, -1)

    parts = [payload, per_group(scale), in_pairs(low), per_super(d), per_super(neg_dmin)]
    return torch.cat(parts, dim=-1).contiguous()
