"""What a start costs before the model: the server's own process imports no torch, the
kernels are found without ninja, and the loading line names the model and its size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rillet.models import cpu_kernels
from rillet.server.serve_cmd import model_label


def test_the_server_process_imports_no_torch() -> None:
    # What `rillet serve` imports before its engine process loads the model (which imports
    # torch there): torch here would cost every start ~2 s for nothing.
    code = (
        "import sys\n"
        "import rillet.cli\n"
        "from rillet.config import EngineConfig\n"
        "from rillet.engine.async_engine import AsyncEngine\n"
        "from rillet.engine.engine_process import EngineProcess\n"
        "from rillet.server.http.app import create_app\n"
        "from rillet.server.serve_cmd import _compile_kernels_first, model_label\n"
        "model_label('qwen2.5-coder-1.5b')\n"
        "_compile_kernels_first(EngineConfig())\n"  # the kernels are built: no torch
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_built_kernels_are_imported_directly(native: ModuleType) -> None:
    assert cpu_kernels.is_built()
    directory = cpu_kernels.build_directory()
    assert directory.name == native.__name__  # rillet_cpu_kernels_<digest of the sources>
    assert Path(native.__file__ or "").parent == directory


def test_a_broken_library_is_compiled_again_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RILLET_CACHE_DIR", str(tmp_path))
    library = cpu_kernels.build_directory() / f"{cpu_kernels.build_directory().name}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    assert cpu_kernels.is_built()
    assert cpu_kernels._import_built() is None
    assert "compiling it again" in caplog.text


def test_old_builds_are_pruned(tmp_path: Path) -> None:
    builds = []
    for i in range(9):
        build = tmp_path / f"rillet_cpu_kernels_{i:016x}"
        build.mkdir()
        os.utime(build, (1_000_000 + i, 1_000_000 + i))
        builds.append(build)
    cpu_kernels._prune_builds(builds[0])  # the one just built, though the oldest
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(b.name for b in [builds[0], *builds[-(cpu_kernels._KEEP_BUILDS - 1) :]])


def test_the_loading_line_names_the_model_and_its_size(tmp_path: Path) -> None:
    assert model_label(None) == "the bundled SmolLM2-135M-Instruct (98 MB)"
    assert model_label("qwen2.5-coder-1.5b") == "qwen2.5-coder-1.5b (1.1 GB)"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(bytes(2_000_000))
    assert model_label(str(gguf)) == f"{gguf} (2 MB)"
    assert model_label("no-such-model") == "no-such-model"


@pytest.mark.slow
def test_an_unknown_model_name_is_one_line_and_a_failed_exit() -> None:
    command = [sys.executable, "-m", "rillet", "serve", "--port", "0", "--grpc-port", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [*command, "--model", "qwen9-7b"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "rillet serve: model 'qwen9-7b' is neither an existing path nor a catalogue model "
        "(smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b; "
        "`rillet models` lists them)"
    )
