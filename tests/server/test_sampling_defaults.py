"""Where a request's unset sampling fields come from: the ``--default-*`` flags, else the
model's own defaults, else the API's; a field the request sets is its own."""

from __future__ import annotations

from typing import Any

import pytest

from rillet.sampling import SamplingParams
from rillet.server.config import ServerConfig
from rillet.server.dialects.openai import ChatCompletionRequest, plan_chat
from rillet.server.dialects.tgi import GenerateRequest, plan
from rillet.server.dialects.ws import plan_generate as plan_ws_frame
from rillet.server.sampling_defaults import MODEL_SOURCE, SamplingDefaults


def test_a_flag_beats_the_model_and_the_model_beats_the_api() -> None:
    defaults = SamplingDefaults(
        {"temperature": 0.2, "top_p": None},
        {"temperature": 0.6, "top_p": 0.9, "top_k": -1, "do_sample": True, "max_length": 20},
    )
    assert defaults.describe() == {
        "temperature": {"value": 0.2, "source": "--default-temperature"},
        "top_p": {"value": 0.9, "source": MODEL_SOURCE},
        "top_k": {"value": 0, "source": MODEL_SOURCE},  # -1 is "off", as 0 is here
    }
    api = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    filled = defaults.apply(api, frozenset({"temperature", "top_p", "min_p"}))
    assert (filled.temperature, filled.top_p, filled.top_k, filled.min_p) == (0.2, 0.9, 0, 0.0)
    # Fields the request set are not in `unset`, and keep the request's values.
    own = SamplingParams(temperature=1.3, top_p=0.5)
    assert defaults.apply(own, frozenset()) is own


def test_a_model_default_that_could_never_be_valid_is_skipped_not_fatal() -> None:
    defaults = SamplingDefaults({}, {"top_p": 1.5, "temperature": "hot", "min_p": 0.05})
    assert defaults.describe() == {"min_p": {"value": 0.05, "source": MODEL_SOURCE}}


@pytest.mark.parametrize(
    "flags",
    [{"default_top_p": 0.0}, {"default_temperature": -1.0}, {"default_repetition_penalty": 0.0}],
)
def test_an_invalid_flag_is_refused_at_start(flags: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="--default-"):
        ServerConfig(**flags)  # type: ignore[arg-type]


def test_every_openai_shaped_door_leaves_only_what_the_body_omits_to_the_server() -> None:
    chat = plan_chat(
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "top_k": -1}
        )
    )
    assert chat.spec.unset == {"top_p", "min_p", "repetition_penalty"}
    frame = plan_ws_frame({"type": "generate", "id": 1, "prompt": "hi", "top_p": 0.5})
    assert frame.spec.unset == {"temperature", "top_k", "min_p", "repetition_penalty"}


def test_tgi_stays_greedy_unless_the_request_samples() -> None:
    def planned(body: dict[str, object]) -> Any:
        request = GenerateRequest.model_validate({"inputs": "hi", **body})
        return plan(request, ServerConfig(), stream=False, full_text_default=False)

    greedy = planned({"parameters": {"max_new_tokens": 4}})
    assert greedy.spec.params.temperature == 0.0 and greedy.spec.unset == frozenset()
    sampled = planned({"parameters": {"do_sample": True, "top_k": 5}})
    # TGI has no min_p: a sampling request always leaves it to the server.
    assert sampled.spec.unset == {"temperature", "top_p", "min_p", "repetition_penalty"}
    # No parameters at all samples, as TGI does: every field is the server's.
    everything = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    assert planned({}).spec.unset == everything
