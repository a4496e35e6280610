"""Reading the small JSON files models ship (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rillet.errors import ModelLoadError


def read_json_object(path: Path, required: bool = False) -> dict[str, Any]:
    """The file's JSON object; ``{}`` when it is absent and not required.

    Raises ModelLoadError when a required file is missing or any file is not a JSON object.
    """
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data
