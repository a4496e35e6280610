"""rillet: an LLM inference server built for token streaming.

The engine imports torch; ``rillet.client`` does not, so ``import rillet.client`` stays
light. Heavy names here are imported lazily for the same reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rillet.errors import (
    GenerationError,
    ModelLoadError,
    OverloadedError,
    RilletError,
    ValidationError,
)
from rillet.protocol import FinishReason, RequestOutput
from rillet.sampling import SamplingParams

if TYPE_CHECKING:
    from rillet.config import EngineConfig
    from rillet.engine.async_engine import AsyncEngine
    from rillet.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineConfig",
    "FinishReason",
    "GenerationError",
    "ModelLoadError",
    "OverloadedError",
    "RequestOutput",
    "RilletError",
    "SamplingParams",
    "ValidationError",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from rillet.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from rillet.engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "EngineConfig":
        from rillet.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'rillet' has no attribute {name!r}")
