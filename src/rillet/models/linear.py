"""Linear layers with CPU-specific weight copies: packed bf16, and 4-/8-bit.

Packed bf16, two kinds:

- rillet's own kernel (``csrc/bf16_linear.cpp``, AVX512-BF16 builds): register-tiled
  vdpbf16ps on a weight laid out in its operand order. At the batch sizes of streaming
  decode it beats oneDNN clearly (30 layers + LM head at 16 rows: 7.1-7.8 ms against
  10.7-11.4; at 64 rows 21.7 against 26; bench/RESULTS.md) and is within 5 % at 512.
  Results differ from ``F.linear`` only in the order of fp32 sums.
- Otherwise oneDNN's own layout (``mkldnn._reorder_linear_weight``): ``F.linear`` hands
  oneDNN a plain row-major weight, which it re-lays-out on every call; packing once at
  load skips that. Same kernels, bit-identical results (19.2 -> 12.7 ms at 16 rows).

Group-quantized copies (``csrc/quantized_linear.cpp``, AVX512-VNNI):

A decode step with a handful of rows is a matrix-vector product: it reads every weight
once and does two FLOPs per weight read, so its speed is the memory bandwidth divided by
the weight bytes. A copy in 4 bits (llama.cpp's Q4_1: groups of 32 with a scale and an
offset, 5 bits a weight in all) or 8 bits (Q8_0) read with integer dot products takes
3.0-4.1 ms for SmolLM2's 30 layers and LM head at one row, against 6.5-9.5 ms for bf16.
With many rows the work is arithmetic, and vpdpbusd does twice vdpbf16ps's products per
instruction: at 64 rows 23 against 29 ms, at 512 rows 162 against 208 (bench/RESULTS.md).
A layer uses its copy for steps of up to ``quantized_max_rows`` rows and its bf16 weight
above that.

The copy changes results: 4-bit weights are coarse unless the checkpoint already was 4-bit,
and the inputs are rounded to 8 bits per group of 32 as llama.cpp does. A GGUF's matrices
in Q4_0/Q4_1/Q4_K (4 bits) or Q5_0/Q5_1/Q5_K/Q8_0 (8 bits) give the copy their own integers
(``gguf_codes``, set by the loader with :meth:`Linear.add_source_codes`); other rows are
quantized from the weight.
``bench/quantization_check.py`` measures what that does to the model.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from rillet.models import group_quantization
from rillet.models.gguf_codes import GroupCodes

#: The largest relative error rillet's bf16 kernel may show on a probe: it differs from
#: ``F.linear`` only in summation order, so anything above bf16 rounding is a bug.
_NATIVE_BF16_TOLERANCE = 1e-2

#: The largest relative error the quantized kernel may show on a probe against fp32 math on
#: the quantized weight: rounding the inputs to 8 bits per group costs ~0.6 %, so anything
#: far above that is a bug.
_QUANTIZED_TOLERANCE = 0.03

#: The row count oneDNN is told to expect when packing; measured to make no difference
#: between 1 and 512 rows, as the kernels it picks are the same.
_PACKING_ROWS = 64


class Linear(nn.Linear):
    """``nn.Linear`` plus optional CPU copies of the weight: packed bf16 (rillet's layout or
    oneDNN's), and 4- or 8-bit for <= ``quantized_max_rows`` rows. Inputs are 2-D
    ``[rows, in_features]``."""

    packed_weight: torch.Tensor | None = None
    packed_native: ModuleType | None = None  # set when packed_weight is rillet's layout
    quantized_weight: torch.Tensor | None = None  # group_quantization.pack's layout
    quantized_bits: int = 0
    quantized_max_rows: int = 0
    quantized_native: ModuleType | None = None
    #: The checkpoint's own integers for runs of this weight's rows (first row -> codes),
    #: until the quantized copy is made from them.
    source_codes: dict[int, GroupCodes] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized_native is not None and x.shape[0] <= self.quantized_max_rows:
            y = self.quantized_native.quantized_linear(
                x.contiguous(), self.quantized_weight, self.quantized_bits
            )
            return y if self.bias is None else y + self.bias
        if self.packed_native is not None:
            y = self.packed_native.bf16_linear(x.contiguous(), self.packed_weight)
            return y if self.bias is None else y + self.bias
        if self.packed_weight is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
            return out
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def enable_packed(self, native: ModuleType | None = None) -> bool:
        """Pack the bf16 weight for rillet's kernel (with ``native``, where it serves this
        shape) or else for oneDNN; False (nothing changes) where neither applies."""
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return False
        if native is not None and self._enable_native_bf16(native):
            return True
        if not torch.backends.mkldnn.is_available():
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACKING_ROWS)
            probe = _probe(3, weight)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        except (RuntimeError, AttributeError):  # a torch build without these ops
            return False
        if not torch.equal(got, F.linear(probe, weight, self.bias)):
            return False
        self.packed_weight = packed
        return True

    def _enable_native_bf16(self, native: ModuleType) -> bool:
        n, k = self.weight.shape
        if n % 16 or k % 2 or not native.bf16_linear_supported():
            return False
        packed = native.pack_bf16_weight(self.weight)
        probe = _probe(11, self.weight)  # 8 + 3: a full register tile and a remainder
        rows = _probe_rows(n)
        expected = probe.float() @ self.weight[rows].float().T
        got = native.bf16_linear(probe, packed)[:, rows]
        if not _close(got, expected, _NATIVE_BF16_TOLERANCE):
            return False
        self.packed_weight, self.packed_native = packed, native
        return True

    @torch.no_grad()
    def enable_quantized(self, bits: int, max_rows: int, native: ModuleType) -> bool:
        """Keep a ``bits``-bit copy of the weight (``group_quantization``) for inputs of at
        most ``max_rows`` rows; False (and nothing changes) where rillet's kernel is missing
        or cannot serve this layer's shape or dtype."""
        weight = self.weight
        if (
            weight.device.type != "cpu"
            or weight.dtype not in (torch.bfloat16, torch.float32)
            or not group_quantization.supports(weight)
            or not native.quantized_linear_supported()
        ):
            return False
        k_scales = self._k_scales()
        u, d, m, bits = self._group_codes(bits)
        self.source_codes = None  # in the copy now, or of no use
        if bits == 4 and k_scales is not None:
            bits = group_quantization.K4
            packed = group_quantization.pack_k4(u, *k_scales)
        else:
            packed = group_quantization.pack(u, d, m, bits)
        probe = _probe(5, weight)  # 4 + 1: a full row tile and a remainder
        rows = _probe_rows(self.out_features)
        expected = probe.float() @ group_quantization.dequantize(u[rows], d[rows], m[rows]).T
        got = native.quantized_linear(probe, packed, bits)[:, rows]
        if not _close(got, expected, _QUANTIZED_TOLERANCE):
            return False
        self.quantized_weight, self.quantized_bits = packed, bits
        self.quantized_max_rows, self.quantized_native = max_rows, native
        return True

    def add_source_codes(self, first_row: int, codes: GroupCodes) -> None:
        """Record the checkpoint's own integers for rows ``first_row`` onwards."""
        rows, groups, _ = codes.u.shape
        if first_row + rows > self.out_features or groups * group_quantization.GROUP != (
            self.in_features
        ):
            raise ValueError(f"codes of shape {tuple(codes.u.shape)} do not fit {self}")
        if self.source_codes is None:
            self.source_codes = {}
        self.source_codes[first_row] = codes

    def _group_codes(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(u, d, m, bits) of the copy: the checkpoint's own codes where every row has 4-bit
        ones, or every row 6-bit ones (Q6_K); else ``bits`` (8 if any row has codes: 4-bit
        codes are valid 8-bit ones) quantized from the weight, with the rows that have codes
        set to them (6-bit codes, whose scales are per 16, quantized again to 8 bits)."""
        parts = self.source_codes or {}
        covered = sum(c.u.shape[0] for c in parts.values())
        widths = {c.bits for c in parts.values()}
        if parts and covered == self.out_features and len(widths) == 1 and widths <= {4, 6}:
            if widths == {6}:
                return self._codes_of_one_width(parts, 6)
            bits = 4
        elif parts:
            bits = 8
            parts = {first: _as_8_bit(c) if c.bits == 6 else c for first, c in parts.items()}
        groups = self.in_features // group_quantization.GROUP
        u = torch.empty(self.out_features, groups, group_quantization.GROUP, dtype=torch.uint8)
        d = torch.empty(self.out_features, groups, dtype=torch.float16)
        m = torch.empty_like(d)
        # Quantize only the rows without codes: the others' float values may never have been
        # loaded (``CausalLM.load_weights``'s ``skip``), and quantizing is row by row.
        row = 0
        for first, codes in sorted(parts.items()):
            if first > row:
                u[row:first], d[row:first], m[row:first] = self._quantize_rows(row, first, bits)
            row = first + codes.u.shape[0]
            u[first:row], d[first:row], m[first:row] = codes.u, codes.d, codes.m
        if row < self.out_features:
            u[row:], d[row:], m[row:] = self._quantize_rows(row, self.out_features, bits)
        return u, d, m, bits

    def _k_scales(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(d, -dmin, scale, min) joined over the rows when every row has Q4_K's own scales
        (``gguf_codes.KScales``) and the inputs fill whole super-blocks; else None."""
        parts = self.source_codes or {}
        ordered = [parts[first] for first in sorted(parts)]
        covered = sum(c.u.shape[0] for c in ordered)
        if (
            not ordered
            or covered != self.out_features
            or self.in_features % 256
            or any(c.k_scales is None for c in ordered)
        ):
            return None
        scales = [c.k_scales for c in ordered if c.k_scales is not None]
        return (
            torch.cat([k.d for k in scales]),
            torch.cat([k.neg_dmin for k in scales]),
            torch.cat([k.scale for k in scales]),
            torch.cat([k.min for k in scales]),
        )

    @staticmethod
    def _codes_of_one_width(
        parts: dict[int, GroupCodes], bits: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Every row's codes, all of width ``bits``, joined in row order."""
        ordered = [parts[first] for first in sorted(parts)]
        u = torch.cat([c.u for c in ordered])
        d = torch.cat([c.d for c in ordered])
        m = torch.cat([c.m for c in ordered])
        return u, d, m, bits

    def _quantize_rows(
        self, start: int, stop: int, bits: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return group_quantization.quantize(self.weight[start:stop], bits)


def _as_8_bit(codes: GroupCodes) -> GroupCodes:
    """6-bit codes (scales per 16) as 8-bit ones (per 32), for a layer whose other rows
    have 4- or 8-bit codes: quantized again from their exact values, as the float weight
    would have been."""
    weight = group_quantization.dequantize(codes.u, codes.d, codes.m)
    u, d, m = group_quantization.quantize(weight, 8)
    return GroupCodes(u, d, m, 8)


def _probe_rows(rows: int) -> torch.Tensor:
    """The output rows a probe checks: the first, a middle and the last block of 16 (a
    packed record's columns). A layout or kernel bug shows in every block; checking all of
    them would cost an fp32 copy of the whole weight, a third of a 1.5B model's load."""
    lanes = group_quantization.LANES
    starts = sorted({0, (rows // lanes // 2) * lanes, max(0, rows - lanes)})
    return torch.cat([torch.arange(s, min(s + lanes, rows)) for s in starts]).unique()


def _close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    """Whether a kernel's probe result is within ``tolerance`` (relative, in norm) of fp32."""
    return bool((got.float() - expected).norm() <= tolerance * expected.norm())


def _probe(rows: int, weight: torch.Tensor) -> torch.Tensor:
    """A fixed random input for checking an alternative kernel against ``F.linear``."""
    probe = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return probe.to(weight.dtype)


def enable_packed_weights(
    model: nn.Module, native: ModuleType | None = None, max_rows: int | None = None
) -> int:
    """Pack every bf16 ``Linear`` weight in ``model`` (see ``Linear.enable_packed``) that
    can see inputs of up to ``max_rows`` rows (None: any) its quantized copy does not take;
    returns how many took it."""
    return sum(
        m.enable_packed(native)
        for m in model.modules()
        if isinstance(m, Linear)
        and (m.quantized_native is None or max_rows is None or m.quantized_max_rows < max_rows)
    )


def enable_quantized_weights(
    model: nn.Module, max_rows: int, native: ModuleType, bits: int, lm_head_bits: int = 8
) -> int:
    """Give every ``Linear`` in ``model`` a ``bits``-bit copy (the one named ``lm_head``
    ``lm_head_bits``) for steps of <= ``max_rows`` rows; returns how many layers took it.

    The LM head gets 8 bits by default: it decides every token, and llama.cpp's own 4-bit
    files keep it (their tied embedding) in Q8_0 or better.
    """
    if max_rows <= 0:
        return 0
    return sum(
        m.enable_quantized(lm_head_bits if name == "lm_head" else bits, max_rows, native)
        for name, m in model.named_modules()
        if isinstance(m, Linear)
    )


def release_float_weights(model: nn.Module, max_rows: int) -> int:
    """Put on the meta device the float weight of every ``Linear`` whose quantized copy takes
    every step of up to ``max_rows`` rows (the engine's step budget), so that no step can
    read it; returns how many were released. A weight shared with another module (a tied
    LM head's, which is the embedding) stays.

    Such a weight is never read again: ``forward`` takes the copy, and the copy was made
    (``enable_quantized``). Keeping it would hold a second copy of the model in bf16 (3 GB
    for a 1.5B model), and its values need not even have been loaded
    (``CausalLM.load_weights``'s ``skip``). A use after all fails loudly on meta.
    """
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    released = 0
    for module in model.modules():
        if (
            isinstance(module, Linear)
            and module.quantized_native is not None
            and module.quantized_max_rows >= max_rows
            and module.weight.device.type != "meta"
            and seen[id(module.weight)] == 1
        ):
            meta = torch.empty_like(module.weight, device="meta")
            module.weight = nn.Parameter(meta, requires_grad=False)
            released += 1
    return released
