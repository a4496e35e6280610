"""Where a request's unset sampling fields come from, the same on every door.

For each of ``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``repetition_penalty``
that a request leaves unset, the server takes, in order:

1. its ``--default-<field>`` flag;
2. else the model's own default: ``generation_config.json`` of an HF folder, or a GGUF's
   ``general.sampling.*`` keys (what vLLM does by default with ``--generation-config auto``);
3. else the API's own default, which the dialect already wrote into the params.

A field the request sets is its own. TGI's routes stay greedy unless the request samples
(``do_sample``, or any sampling field): there the defaults fill only the fields left unset
of a sampling request. The fixed greedy paths (plain text, the WebSocket chat) have no
sampling fields to fill.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams

log = logging.getLogger("rillet.server")

#: The sampling fields a default may fill (generation_config.json's names, which are ours).
DEFAULTABLE: tuple[str, ...] = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
#: Where the model's own defaults are read from, as /info names them.
MODEL_SOURCE = "model (generation_config.json or GGUF general.sampling)"


@dataclass(frozen=True)
class Default:
    """One field's default and where it came from (a flag's name, or ``MODEL_SOURCE``)."""

    value: float | int
    source: str


class SamplingDefaults:
    """The defaults in force for one served model; ``apply`` fills a request's unset fields."""

    def __init__(self, flags: Mapping[str, float | int | None], model: Mapping[str, Any]) -> None:
        """``flags``: field -> the ``--default-*`` value or None; ``model``: the model's
        generation defaults as loaded (unknown keys and unusable values are skipped)."""
        self.values: dict[str, Default] = {}
        for name in DEFAULTABLE:
            flag = flags.get(name)
            if flag is not None:
                self.values[name] = Default(_checked(name, flag), f"--default-{_dashed(name)}")
                continue
            value = model.get(name)
            if value is None:
                continue
            try:
                self.values[name] = Default(_checked(name, value), MODEL_SOURCE)
            except ValidationError as exc:
                log.warning("ignoring the model's default %s=%r: %s", name, value, exc)

    def apply(self, params: SamplingParams, unset: frozenset[str]) -> SamplingParams:
        """``params`` with every field in ``unset`` that has a default replaced by it."""
        chosen: dict[str, Any] = {n: d.value for n, d in self.values.items() if n in unset}
        return dataclasses.replace(params, **chosen) if chosen else params

    def describe(self) -> dict[str, dict[str, Any]]:
        """What /info shows: each default in force and its source."""
        return {n: {"value": d.value, "source": d.source} for n, d in self.values.items()}


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _checked(name: str, value: Any) -> float | int:
    """A default as SamplingParams wants it; ValidationError when it could never be valid."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"`{name}` must be a number")
    if name == "top_k":
        if value != int(value):
            raise ValidationError("`top_k` must be an integer")
        return max(0, int(value))  # -1 (vLLM, llama.cpp) and 0 both mean off
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(f"`{name}` must be finite")
    probe: dict[str, Any] = {name: number}
    SamplingParams(**probe).validate()
    return number
