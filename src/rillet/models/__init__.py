"""Model definitions and the code that reads model files (HF folders and GGUF).

The package's own names are imported on first use: ``rillet serve``'s own process reads
the catalogue and checks for the compiled kernels through this package, and must not pay
for torch (about 2 s), which only its engine process needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rillet.models.config import ModelConfig
    from rillet.models.loader import LoadedModel, load_model_files, resolve_model_path

__all__ = ["LoadedModel", "ModelConfig", "load_model_files", "resolve_model_path"]


def __getattr__(name: str) -> Any:
    if name == "ModelConfig":
        from rillet.models.config import ModelConfig

        return ModelConfig
    if name in ("LoadedModel", "load_model_files", "resolve_model_path"):
        from rillet.models import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
