"""Field types and value rules that several dialects share.

Bodies are lenient as real servers are: unknown keys are ignored (TGI has no
``deny_unknown_fields``; vLLM uses ``extra="allow"``), every optional field takes
``null``, and ``stop`` may be a string or a list.
"""

from __future__ import annotations

import math

import pydantic
from pydantic import BaseModel, ConfigDict

#: vLLM clamps logprobs to this so ``-inf`` never reaches JSON.
MIN_LOGPROB = -9999.0


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


Stop = str | list[str] | None


def stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def clean_logprob(value: float | None) -> float | None:
    """A JSON-safe logprob: NaN -> null (TGI's first prefill token), -inf -> -9999."""
    if value is None or math.isnan(value):
        return None
    return max(float(value), MIN_LOGPROB)


def first_problem(exc: pydantic.ValidationError, where_default: str) -> str:
    """``"<field path>: <message>"`` of a body's first problem, for a ValidationError."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or where_default
    return f"{where}: {first['msg']}"
