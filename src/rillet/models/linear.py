"""Linear layers with CPU-specific weight copies: packed bf16, and int8 for small batches.

Packed bf16, two kinds:

- rillet's own kernel (``csrc/bf16_linear.cpp``, AVX512-BF16 builds): register-tiled
  vdpbf16ps on a weight laid out in its operand order. At the batch sizes of streaming
  decode it beats oneDNN clearly (30 layers + LM head at 16 rows: 7.1-7.8 ms against
  10.7-11.4; at 64 rows 21.7 against 26; bench/RESULTS.md) and is within 5 % at 512.
  Results differ from ``F.linear`` only in the order of fp32 sums.
- Otherwise oneDNN's own layout (``mkldnn._reorder_linear_weight``): ``F.linear`` hands
  oneDNN a plain row-major weight, which it re-lays-out on every call; packing once at
  load skips that. Same kernels, bit-identical results (19.2 -> 12.7 ms at 16 rows).

Int8 for small batches:

A decode step with a handful of rows is a matrix-vector product: it reads every weight
once and does two FLOPs per weight read, so its speed is the memory bandwidth divided by
the weight bytes. An int8 copy of each weight (symmetric, one scale per output row) halves
those bytes; on this project's CPU torch's ``_weight_int8pack_mm`` runs the 30-layer
SmolLM2 matmuls in 4.5 ms against 10.8 ms for bf16 at one row (see bench/RESULTS.md).
Above a few rows the work becomes compute-bound and the bf16 GEMM wins, so each layer
keeps both copies and picks by the number of rows.

The int8 copy changes results slightly (the per-row rounding error is about 0.4% of the
row's largest weight); ``bench/int8_check.py`` measures what that does to the model.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

#: The largest relative error rillet's bf16 kernel may show on a probe: it differs from
#: ``F.linear`` only in summation order, so anything above bf16 rounding is a bug.
_NATIVE_BF16_TOLERANCE = 1e-2

#: The largest relative error the int8 kernel may show on a probe before a layer keeps
#: bf16 only. Correct results are ~1%; torch's kernel silently miscomputes some shapes
#: (inner sizes that are not a multiple of 16), which a probe catches.
_PROBE_TOLERANCE = 0.05

#: The most rows rillet's int8 kernel takes (its register blocking is unrolled per row count).
_NATIVE_INT8_MAX_ROWS = 8

#: The row count oneDNN is told to expect when packing; measured to make no difference
#: between 1 and 512 rows, as the kernels it picks are the same.
_PACKING_ROWS = 64


class Linear(nn.Linear):
    """``nn.Linear`` plus optional CPU copies of the weight: packed bf16 (rillet's layout or
    oneDNN's), and int8 for <= ``int8_max_rows`` rows. Inputs are 2-D ``[rows, in_features]``."""

    packed_weight: torch.Tensor | None = None
    packed_native: ModuleType | None = None  # set when packed_weight is rillet's layout
    int8_weight: torch.Tensor | None = None
    int8_scales: torch.Tensor | None = None
    int8_max_rows: int = 0
    int8_native: ModuleType | None = None  # rillet's kernel module, when it has int8_linear
    int8_helpers: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_weight is not None and x.shape[0] <= self.int8_max_rows:
            assert self.int8_scales is not None
            if self.int8_native is not None and x.dtype == torch.bfloat16:
                y = self.int8_native.int8_linear(
                    x, self.int8_weight, self.int8_scales, self.int8_helpers
                )
            else:
                y = torch._weight_int8pack_mm(x, self.int8_weight, self.int8_scales)
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
        expected = probe.float() @ self.weight.float().T
        got = native.bf16_linear(probe, packed).float()
        if (got - expected).norm() > _NATIVE_BF16_TOLERANCE * expected.norm():
            return False
        self.packed_weight, self.packed_native = packed, native
        return True

    @torch.no_grad()
    def enable_int8(
        self, max_rows: int, native: ModuleType | None = None, helpers: int = 0
    ) -> bool:
        """Quantize the weight per output row; False (and nothing changes) if the kernel
        cannot serve this layer's shape or dtype correctly.

        With ``native`` (rillet's kernels, built with AVX512-BF16) bf16 inputs go through
        its ``int8_linear`` on the calling thread plus ``helpers`` helper threads that the
        step never waits for (``csrc/work_pool.h``); else through torch's kernel.
        """
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
            return False
        if weight.shape[1] % 16 != 0:
            return False
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        scales = scales.to(weight.dtype)
        probe = _probe(1, weight)
        expected = F.linear(probe, weight).float()
        got = torch._weight_int8pack_mm(probe, q, scales).float()
        if (got - expected).norm() > _PROBE_TOLERANCE * expected.norm():
            return False
        self.int8_weight, self.int8_scales, self.int8_max_rows = q, scales, max_rows
        if (
            native is not None
            and max_rows <= _NATIVE_INT8_MAX_ROWS
            and weight.dtype == torch.bfloat16
            and weight.shape[1] % 32 == 0
            and native.int8_linear_supported()
        ):
            self.int8_native, self.int8_helpers = native, helpers
        return True


def _probe(rows: int, weight: torch.Tensor) -> torch.Tensor:
    """A fixed random input for checking an alternative kernel against ``F.linear``."""
    probe = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return probe.to(weight.dtype)


def enable_packed_weights(model: nn.Module, native: ModuleType | None = None) -> int:
    """Pack every bf16 ``Linear`` weight in ``model`` (see ``Linear.enable_packed``);
    returns how many took it."""
    return sum(m.enable_packed(native) for m in model.modules() if isinstance(m, Linear))


def enable_int8_small_batches(
    model: nn.Module, max_rows: int, native: ModuleType | None = None, helpers: int = 0
) -> int:
    """Give every ``Linear`` in ``model`` an int8 copy for <= ``max_rows`` rows; returns how
    many layers took it. ``native``/``helpers``: see ``Linear.enable_int8``."""
    if max_rows <= 0:
        return 0
    return sum(
        m.enable_int8(max_rows, native, helpers) for m in model.modules() if isinstance(m, Linear)
    )


def uses_native_int8(model: nn.Module) -> bool:
    """Whether any ``Linear`` in ``model`` runs its int8 copy on rillet's kernel."""
    return any(isinstance(m, Linear) and m.int8_native is not None for m in model.modules())
