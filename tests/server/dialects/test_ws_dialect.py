"""The /ws frames dialect, fuzzed: whatever a client sends, a frame becomes a plan whose
sampling parameters validate, or a typed error the door sends back as an error frame (the
door catches nothing else, so anything else would end the socket)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from json_strategies import json_values
from rillet.constraint import Constraint
from rillet.errors import RilletError
from rillet.server.dialects import ws

SAMPLING_FIELDS = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_choice",
    "guided_regex",
    "speculative.n_max",
]
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values}) | json_values,
    max_size=3,
)
frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "cancel"]), "id": json_values},
    optional={
        "prompt": json_values,
        "messages": messages | json_values,
        **{name: json_values for name in SAMPLING_FIELDS},
    },
)


@given(frame=frames | json_values)
@settings(max_examples=400)
def test_any_frame_is_a_plan_or_a_typed_error(frame: Any) -> None:
    with contextlib.suppress(RilletError, ws.FrameError):
        _, kind, parsed = ws.parse_frame(json.dumps(frame))
        if kind == "generate":
            ws.plan_generate(parsed).spec.params.validate()


def test_a_generate_frame_takes_the_openai_and_vllm_constraints() -> None:
    frame = {"type": "generate", "id": 1, "prompt": "Hi"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for fields in (
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"json_object": True}},
    ):
        assert ws.plan_generate({**frame, **fields}).spec.params.constraint == (
            Constraint.json_object()
        )
    plan = ws.plan_generate({**frame, "guided_json": schema})
    assert plan.spec.params.constraint == Constraint.json_schema(schema)


def test_a_generate_frame_takes_the_per_request_draft_cap() -> None:
    """llama-server's ``speculative.n_max``, as on the OpenAI routes."""
    frame = {"type": "generate", "id": 1, "prompt": "Hi"}
    assert ws.plan_generate(frame).spec.params.num_speculative_tokens is None
    plan = ws.plan_generate({**frame, "speculative.n_max": 3})
    assert plan.spec.params.num_speculative_tokens == 3
