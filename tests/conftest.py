"""Shared fixtures: real ``rillet serve`` processes on loopback with the bundled model.

* ``server``: default options. Session-scoped: started once, on first use.
* ``tiny_model_dir``, ``tiny_gemma``: a tiny random-weight Llama, and Gemma 3, as HF folders
  (``fixtures_models.py``).
* ``native``: the compiled CPU kernel module (a test using it fails if it did not build).

Other tests that need their own options call ``start_server([...])`` from
``tests/support/server_process.py`` and ``stop()`` the handle when done.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

from fixtures_models import tiny_gemma, tiny_model_dir
from server_process import ServerHandle, start_server

__all__ = ["tiny_gemma", "tiny_model_dir"]

# Property tests are deterministic: the same examples on every run (no example database, a
# fixed seed), so a failure in CI fails the same way here. No deadline: the VM is noisy.
settings.register_profile(
    "rillet",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("rillet")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    handle = start_server()
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def native() -> ModuleType:
    from rillet.models import cpu_kernels

    module = cpu_kernels.load()
    if module is None:
        pytest.fail("the native CPU kernels did not compile (see the warning in the log)")
    return module
