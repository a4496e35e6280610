"""EngineConfig's automatic KV cache size, read from a ``/proc/meminfo`` the test writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rillet.config import EngineConfig, auto_kv_cache_bytes
from rillet.errors import ModelLoadError

GIB = 1 << 30


@pytest.mark.parametrize(
    ("available_kib", "expected"),
    [
        (24 * (1 << 20), int(24 * GIB * 0.2)),  # a fifth of what is available
        (1 << 20, 512 << 20),  # at least 512 MiB
        (200 * (1 << 20), 8 * GIB),  # at most 8 GiB
    ],
)
def test_the_auto_kv_cache_is_a_fifth_of_available_memory_within_bounds(
    tmp_path: Path, available_kib: int, expected: int
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        f"MemTotal:       {2 * available_kib} kB\nMemAvailable:   {available_kib} kB\n"
    )
    assert auto_kv_cache_bytes(str(meminfo)) == expected


def test_without_meminfo_the_auto_kv_cache_is_one_gib(tmp_path: Path) -> None:
    assert auto_kv_cache_bytes(str(tmp_path / "missing")) == GIB
    (tmp_path / "odd").write_text("MemTotal: 5 kB\n")
    assert auto_kv_cache_bytes(str(tmp_path / "odd")) == GIB


def test_a_kv_cache_size_must_be_positive() -> None:
    assert EngineConfig().kv_cache_memory_bytes is None  # auto
    with pytest.raises(ModelLoadError):
        EngineConfig(kv_cache_memory_bytes=0)


def test_the_kv_cache_dtype_is_auto_or_int8_and_rillet_serve_passes_it_on() -> None:
    from rillet.cli import build_parser
    from rillet.server.serve_options import configs_of

    assert EngineConfig().kv_cache_dtype is None  # chosen by the builder
    with pytest.raises(ModelLoadError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    options = build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    engine, _ = configs_of(vars(options))
    assert engine.kv_cache_dtype == "int8"
    assert configs_of(vars(build_parser().parse_args(["serve"])))[0].kv_cache_dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])


@pytest.mark.parametrize(
    ("asked", "device", "dtype", "kernels", "int8"),
    [
        (None, "cpu", "bfloat16", True, True),  # the CPU serving default
        (None, "cpu", "float32", True, False),  # fp32: the exact reference stays exact
        (None, "cpu", "bfloat16", False, False),  # no kernels: the torch path would widen
        (None, "cuda", "bfloat16", True, False),
        ("auto", "cpu", "bfloat16", True, False),
        ("int8", "cpu", "float32", False, True),
    ],
)
def test_the_8bit_kv_cache_is_the_default_for_bf16_on_cpu_with_the_kernels(
    asked: str | None, device: str, dtype: str, kernels: bool, int8: bool
) -> None:
    import torch

    from rillet.engine.builder import resolve_kv_cache_dtype

    native = object() if kernels else None
    config = EngineConfig(kv_cache_dtype=asked)
    model_dtype = getattr(torch, dtype)
    got = resolve_kv_cache_dtype(config, torch.device(device), model_dtype, native)  # type: ignore[arg-type]
    assert got == (torch.int8 if int8 else model_dtype)


def test_an_8bit_kv_cache_holds_more_tokens_in_the_same_memory() -> None:
    import torch

    from rillet.engine.builder import kv_bytes_per_token
    from rillet.models.config import ModelConfig

    cfg = ModelConfig(
        architecture="llama", vocab_size=10, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    )  # fmt: skip
    bf16 = kv_bytes_per_token(cfg, torch.bfloat16)
    assert bf16 == 2 * 30 * 3 * 64 * 2
    # 64 codes and two fp32 scales (one per 32 values) a row
    assert kv_bytes_per_token(cfg, torch.int8) == 2 * 30 * 3 * (64 + 2 * 4)
