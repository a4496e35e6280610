"""TGI's dialect without a server: body leniency, the mapping rules, and its JSON."""

from __future__ import annotations

import math

import pytest

from fake_engine import char_tokenizer
from rillet.constraint import Constraint
from rillet.engine.detokenizer import RequestTextState
from rillet.errors import GenerationError, ValidationError
from rillet.protocol import (
    FinishReason,
    GeneratedToken,
    GeneratedTopToken,
    RequestOutput,
    TokenDelta,
)
from rillet.sampling import SamplingParams
from rillet.server.config import ServerConfig
from rillet.server.dialects import tgi
from rillet.server.dialects.fields import clean_logprob, stop_list

CONFIG = ServerConfig()


def plan(parameters: dict[str, object] | None, stream: bool = False) -> tgi.TgiPlan:
    body = {"inputs": "Hi"} if parameters is None else {"inputs": "Hi", "parameters": parameters}
    request = tgi.GenerateRequest.model_validate(body)
    return tgi.plan(request, CONFIG, stream=stream, full_text_default=False)


def test_bodies_are_lenient() -> None:
    body = tgi.GenerateRequest.model_validate(
        {"inputs": "x", "parameters": {"stop": "a", "top_k": None, "unknown": 1}, "extra": []}
    )
    assert body.parameters is not None and stop_list(body.parameters.stop) == ["a"]


def test_logprobs_are_json_safe() -> None:
    assert clean_logprob(float("nan")) is None
    assert clean_logprob(float("-inf")) == -9999.0
    assert clean_logprob(-0.5) == -0.5 and clean_logprob(None) is None


def test_no_parameters_samples_and_reports_its_seed() -> None:
    sampled = plan(None)
    assert sampled.spec.params.temperature == 1.0 and sampled.seed is not None
    assert sampled.spec.params.seed == sampled.seed
    greedy = plan({})
    assert greedy.spec.params.is_greedy and greedy.seed is None


@pytest.mark.parametrize(
    ("parameters", "greedy"),
    [
        ({"do_sample": True}, False),
        ({"top_k": 5}, False),
        ({"temperature": 0.7}, False),
        ({"temperature": 0, "do_sample": True}, True),  # lenient: 0 is greedy
        ({"top_p": 1.0}, False),
        ({"max_new_tokens": 3}, True),
    ],
)
def test_sampling_is_on_when_asked_or_any_knob_is_set(
    parameters: dict[str, object], greedy: bool
) -> None:
    assert plan(parameters).spec.params.is_greedy is greedy


def test_a_given_seed_is_kept_and_tgi_keeps_stop_strings_in_the_text() -> None:
    planned = plan({"do_sample": True, "seed": 7, "stop": ["x"], "truncate": 3})
    params = planned.spec.params
    assert params.seed == 7 and planned.seed == 7
    assert params.stop == ["x"] and params.include_stop_str_in_output
    assert params.logprobs and planned.spec.truncate == 3


@pytest.mark.parametrize(
    ("parameters", "stream", "message"),
    [
        ({"top_n_tokens": 6}, False, "`top_n_tokens` must be >= 0 and <= 5"),
        ({"best_of": 2}, False, "`best_of`"),
        ({"temperature": -1}, False, "`temperature`"),
        ({"grammar": {"type": "json"}}, False, "grammar.value"),
        ({"grammar": {"type": "ebnf", "value": "x"}}, False, "grammar.type"),
        ({"grammar": {"type": "regex", "value": 5}}, False, "string"),
        ({"grammar": {"type": "json", "value": "{bad"}}, False, "JSON"),
        ({"grammar": {"type": "json_schema", "value": {"name": "x"}}}, False, "schema"),
        ({"decoder_input_details": True}, True, "streaming"),
    ],
)
def test_what_tgi_refuses(parameters: dict[str, object], stream: bool, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        plan(parameters, stream=stream)


def test_grammar_becomes_a_constraint() -> None:
    schema = {"properties": {"location": {"type": "string"}}}
    as_json = Constraint.json_schema(schema)
    for grammar in (
        {"type": "json", "value": schema},
        {"type": "json", "value": '{"properties": {"location": {"type": "string"}}}'},
        {"type": "json_object", "value": schema},
        {"type": "json_schema", "value": {"name": "loc", "schema": schema}},
    ):
        assert plan({"grammar": grammar}).spec.params.constraint == as_json
    regex = plan({"grammar": {"type": "regex", "value": "\\d{3}-\\d{4}"}}).spec.params
    assert regex.constraint == Constraint.regex("\\d{3}-\\d{4}")
    assert plan({}).spec.params.constraint is None


def test_errors_carry_tgis_prefixes() -> None:
    assert tgi.error_body(ValidationError("`inputs` cannot be empty")) == {
        "error": "Input validation error: `inputs` cannot be empty",
        "error_type": "validation",
    }
    assert tgi.error_body(GenerationError("boom"))["error"] == (
        "Request failed during generation: boom"
    )


def test_stream_events_and_the_answer() -> None:
    tokenizer = char_tokenizer()
    planned = plan({"details": True, "top_n_tokens": 1, "return_full_text": True})
    renderer = tgi.TgiRenderer(tokenizer, planned)
    top = [GeneratedTopToken(33, "H", -0.1, False)]
    first = RequestOutput("r", [GeneratedToken(33, "H", -0.1, False, top)], "H", None, 2, 1)
    eos = GeneratedToken(2, "", float("-inf"), True)
    last = RequestOutput(
        "r", [GeneratedToken(18, "i", math.nan, False), eos], "i", FinishReason.EOS_TOKEN, 2, 3
    )
    events = renderer.events(first) + renderer.events(last)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert events[0]["top_tokens"] == [{"id": 33, "text": "H", "logprob": -0.1, "special": False}]
    assert events[0]["generated_text"] is None and events[0]["details"] is None
    # EOS shows its own text, as TGI streams it; generated_text skips it.
    assert events[2]["token"] == {
        "id": 2,
        "text": "<|im_end|>",
        "logprob": -9999.0,
        "special": True,
    }
    assert events[2]["generated_text"] == "HiHi"  # return_full_text: the prompt first
    assert events[2]["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": 3,
        "seed": None,
        "input_length": 2,
    }
    first.merge(last)
    answer = renderer.answer(first)
    assert answer["generated_text"] == "HiHi"
    assert answer["details"]["prefill"] == [] and len(answer["details"]["tokens"]) == 3
    assert answer["details"]["top_tokens"][0][0]["id"] == 33


def test_a_speculative_step_streams_one_event_per_token() -> None:
    """A step that accepted drafts hands the front end one delta with several tokens: TGI
    streams each as its own event, with its own text and logprob; a stop string inside the
    run ends the stream at its token."""
    tokenizer = char_tokenizer()
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop=["lo"], logprobs=True)
    state = RequestTextState(tokenizer, tokenizer.encode("Hi"), params)
    renderer = tgi.TgiRenderer(tokenizer, plan({"details": True}))
    ids = tokenizer.encode("Hel")
    first = state.process(TokenDelta("r", ids, logprobs=[-0.1, -0.2, -0.3]))
    assert first is not None and len(first.tokens) == 3
    events = renderer.events(first)
    assert [(e["index"], e["token"]["text"], e["token"]["logprob"]) for e in events] == [
        (1, "H", -0.1),
        (2, "e", -0.2),
        (3, "l", -0.3),
    ]
    # The next run crosses the stop string "lo": its tokens end at "o".
    last = state.process(TokenDelta("r", tokenizer.encode("lo w"), logprobs=[-0.4] * 4))
    assert last is not None and state.stop_hit
    events = renderer.events(last)
    assert [e["token"]["text"] for e in events] == ["l", "o"]
    assert [e["index"] for e in events] == [4, 5]
    assert events[-1]["generated_text"] == "Hel"
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
