"""Model definitions and the code that reads model files (HF folders and GGUF)."""

from rillet.models.config import ModelConfig
from rillet.models.loader import LoadedModel, load_model_files, resolve_model_path

__all__ = ["LoadedModel", "ModelConfig", "load_model_files", "resolve_model_path"]
