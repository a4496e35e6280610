"""The engine's own checks (``engine/inputs.py`` and the core's guard): what its Python
callers meet (``LLM``, ``AsyncEngine.make_request``), in neutral words, never a wire
format's field names. A server's client is checked by the service (tests/server)."""

from __future__ import annotations

import pytest

from fake_engine import char_tokenizer
from rillet.engine.core import EngineCore
from rillet.engine.inputs import build_request, check_prompt_length, check_token_ids
from rillet.engine.scheduler import Scheduler, SchedulerConfig
from rillet.errors import ValidationError
from rillet.protocol import EngineRequest
from rillet.sampling import SamplingParams

TOKENIZER = char_tokenizer()
VOCAB = TOKENIZER.vocab_size
MAX_MODEL_LEN = 8
TOO_LONG = "prompt token ids must be fewer than max_model_len (8). Given: {}"


def build(prompt: str | list[int], params: SamplingParams | None = None) -> EngineRequest:
    return build_request(TOKENIZER, VOCAB, MAX_MODEL_LEN, prompt, params or SamplingParams())


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(), "prompt must not be empty"),
        ([], SamplingParams(), "prompt token ids must not be empty"),
        ("x" * 8, SamplingParams(), TOO_LONG.format(8)),
        ([1] * 9, SamplingParams(), TOO_LONG.format(9)),
        ([1, VOCAB], SamplingParams(), f"prompt token ids must be integers in [0, {VOCAB})"),
        ([1, -1], SamplingParams(), f"prompt token ids must be integers in [0, {VOCAB})"),
        ([1, True], SamplingParams(), f"prompt token ids must be integers in [0, {VOCAB})"),
        ("hi", SamplingParams(top_p=0.0), "`top_p` must be > 0.0 and <= 1.0"),
        ("hi", SamplingParams(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    ],
)  # fmt: skip
def test_build_request_refuses_in_neutral_words(
    prompt: str | list[int], params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        build(prompt, params)
    assert refused.value.message == message
    assert "`inputs`" not in refused.value.message


def test_build_request_keeps_the_params_and_the_ids() -> None:
    params = SamplingParams(max_new_tokens=None)
    request = build_request(TOKENIZER, VOCAB, MAX_MODEL_LEN, "x" * 7, params, request_id="r1")
    assert request.request_id == "r1" and request.params is params
    assert request.prompt_token_ids == TOKENIZER.encode("x" * 7)
    assert build([1, 2, 3]).prompt_token_ids == [1, 2, 3]
    assert build("a").request_id != build("a").request_id


def test_the_shared_checks_pass_what_fits() -> None:
    check_token_ids([0, VOCAB - 1], VOCAB)
    check_prompt_length(1, 2)
    with pytest.raises(ValidationError, match="fewer than max_model_len"):
        check_prompt_length(2, 2)


class _NoRunner:
    """A runner that only takes requests (the core hands each one its constraint)."""

    def add_request(self, request: object) -> None:
        pass


def core() -> EngineCore:
    config = SchedulerConfig(max_model_len=MAX_MODEL_LEN, num_blocks=8, block_size=4)
    return EngineCore(_NoRunner(), Scheduler(config), MAX_MODEL_LEN)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompt token ids must not be empty"),
        ([1] * 8, TOO_LONG.format(8)),
    ],
)
def test_the_core_guards_requests_nobody_checked(prompt: list[int], message: str) -> None:
    engine = core()
    with pytest.raises(ValidationError) as refused:
        engine.add_request(EngineRequest("bad", prompt, SamplingParams()))
    assert refused.value.message == message
    assert not engine.has_unfinished_requests()


def test_the_core_cuts_the_cap_to_the_room_left() -> None:
    engine = core()
    engine.add_request(EngineRequest("all", [1] * 5, SamplingParams(max_new_tokens=None)))
    engine.add_request(EngineRequest("over", [1] * 5, SamplingParams(max_new_tokens=100)))
    engine.add_request(EngineRequest("under", [1] * 5, SamplingParams(max_new_tokens=2)))
    caps = {r.request_id: r.max_new_tokens for r in engine.scheduler.waiting}
    assert caps == {"all": 3, "over": 3, "under": 2}
