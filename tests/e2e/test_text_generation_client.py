"""``text-generation`` 0.7.0 and ``huggingface_hub`` 0.x (its pin) against real servers.

They cannot share the main venv with huggingface_hub 2.x, so they live in ``.venv-tgi`` at
the repo root (``python -m venv .venv-tgi && .venv-tgi/bin/pip install text-generation
requests``; override with ``RILLET_TGI_PYTHON``) and run as
``tests/support/text_generation_checks.py`` in a subprocess against this session's server.
Their 429 check runs against rillet's app on a fake engine whose only slot this test holds,
so nothing races the engine.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from app_server import door, held_stream
from server_process import ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ROOT / "tests" / "support" / "text_generation_checks.py"
TGI_PYTHON = os.environ.get("RILLET_TGI_PYTHON", str(ROOT / ".venv-tgi" / "bin" / "python"))


async def test_text_generation_client_and_hub_0x(server: ServerHandle) -> None:
    if not Path(TGI_PYTHON).exists():
        pytest.fail(
            f"{TGI_PYTHON} is missing: python -m venv .venv-tgi && "
            ".venv-tgi/bin/pip install text-generation requests"
        )
    async with door(max_concurrent_requests=1) as full, held_stream(full):
        checks = await asyncio.create_subprocess_exec(
            *(
                TGI_PYTHON,
                str(CHECKS),
                server.url,
                full.url,
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(checks.communicate(), 240))[0].decode()
    print(output)
    assert checks.returncode == 0, output
    assert output.count("ok   ") == 12
