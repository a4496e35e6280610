"""``text-generation`` 0.7.0 and ``huggingface_hub`` 0.x (its pin) against real servers.

They cannot share the main venv with huggingface_hub 2.x, so they live in ``.venv-tgi`` at
the repo root (``python -m venv .venv-tgi && .venv-tgi/bin/pip install text-generation
requests``; override with ``RILLET_TGI_PYTHON``) and run as ``tests/text_generation_checks.py``
in a subprocess against this session's servers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from server_process import LIMITED_API_KEY, ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TESTS = Path(__file__).parent
TGI_PYTHON = os.environ.get("RILLET_TGI_PYTHON", str(TESTS.parent / ".venv-tgi" / "bin" / "python"))


def test_text_generation_client_and_hub_0x(
    server: ServerHandle, limited_server: ServerHandle
) -> None:
    if not Path(TGI_PYTHON).exists():
        pytest.fail(
            f"{TGI_PYTHON} is missing: python -m venv .venv-tgi && "
            ".venv-tgi/bin/pip install text-generation requests"
        )
    result = subprocess.run(
        [
            TGI_PYTHON,
            str(TESTS / "text_generation_checks.py"),
            server.url,
            limited_server.url,
            LIMITED_API_KEY,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 9
