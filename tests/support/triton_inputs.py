"""The vLLM backend's input tensors, as a tritonclient user builds them (shared by the gRPC
tests on a fake engine, on a real server and through Ray Serve)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tritonclient.grpc as tc


def vllm_inputs(
    prompt: str, *, stream: bool = True, sampling: dict[str, Any] | None = None
) -> list[tc.InferInput]:
    """``text_input`` and ``stream``, and ``sampling_parameters`` (JSON) when given."""
    made = [tc.InferInput("text_input", [1], "BYTES"), tc.InferInput("stream", [1], "BOOL")]
    made[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    made[1].set_data_from_numpy(np.array([stream], dtype=bool))
    if sampling is not None:
        params = tc.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        made.append(params)
    return made
