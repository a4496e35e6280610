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
