"""SamplingParams: frozen (a change is a new value), and its one check of every field."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams


def test_params_are_frozen_and_replace_makes_a_new_value() -> None:
    params = SamplingParams(max_new_tokens=None, temperature=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_new_tokens = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0  # type: ignore[misc]
    filled = dataclasses.replace(params, max_new_tokens=5)
    assert filled.max_new_tokens == 5 and filled.is_greedy
    assert params.max_new_tokens is None  # the original is untouched


def test_params_cross_a_process_boundary_unchanged() -> None:
    # The engine process receives them pickled.
    params = SamplingParams(stop=["\n"], stop_token_ids=[7], seed=3, top_p=0.5)
    assert pickle.loads(pickle.dumps(params)) == params


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"min_tokens": 5, "max_new_tokens": 4}, "`min_tokens` must be <= `max_new_tokens`"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and <= 1.0"),
        ({"temperature": -1.0}, "`temperature` must be >= 0.0"),
        ({"top_logprobs": 21}, "`top_logprobs` must be between 0 and 20"),
        ({"stop": [""]}, "`stop` sequences must be non-empty strings"),
    ],
)
def test_validate_names_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        SamplingParams(**fields).validate()  # type: ignore[arg-type]
    assert refused.value.message == message


def test_validate_returns_the_params_themselves() -> None:
    params = SamplingParams()
    assert params.validate() is params
