"""Token limits: resolved against the context, refused in the client's words, and an unset
cap filled in a new params value (SamplingParams is frozen)."""

from __future__ import annotations

import pytest

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.limits import FieldNames, TokenLimits

OPENAI = FieldNames(prompt="prompt", max_new_tokens="max_tokens")


def test_resolve_follows_the_context_and_never_exceeds_it() -> None:
    assert TokenLimits.resolve(None, None, 64) == TokenLimits(63, 64)
    assert TokenLimits.resolve(10, 20, 64) == TokenLimits(10, 20)
    assert TokenLimits.resolve(100, 200, 64) == TokenLimits(63, 64)
    with pytest.raises(ValueError, match="no room for input tokens"):
        TokenLimits.resolve(None, 1, 64)


def test_apply_fills_an_unset_cap_in_a_new_value() -> None:
    limits = TokenLimits(10, 20)
    unset = SamplingParams(max_new_tokens=None, temperature=0.0)
    filled = limits.apply(4, unset)
    assert filled.max_new_tokens == 16 and filled.temperature == 0.0
    assert unset.max_new_tokens is None  # not changed in place
    given = SamplingParams(max_new_tokens=16)
    assert limits.apply(4, given) is given  # a cap that fits is kept as it is


def test_apply_refuses_in_the_clients_words() -> None:
    limits = TokenLimits(10, 20)
    with pytest.raises(ValidationError) as long_prompt:
        limits.apply(11, SamplingParams(max_new_tokens=1), OPENAI)
    assert long_prompt.value.message == "`prompt` must have less than 10 tokens. Given: 11"
    with pytest.raises(ValidationError) as over:
        limits.apply(10, SamplingParams(max_new_tokens=11))
    assert over.value.message == (
        "`inputs` tokens + `max_new_tokens` must be <= 20. "
        "Given: 10 `inputs` tokens and 11 `max_new_tokens`"
    )
    assert limits.apply(10, SamplingParams(max_new_tokens=10)).max_new_tokens == 10


def test_cap_and_truncate_checks() -> None:
    limits = TokenLimits(10, 20)
    with pytest.raises(ValidationError) as zero:
        limits.check_cap(SamplingParams(max_new_tokens=0), OPENAI)
    assert zero.value.message == "`max_tokens` must be strictly positive"
    limits.check_cap(SamplingParams(max_new_tokens=None))
    with pytest.raises(ValidationError) as truncate:
        limits.check_truncate(11)
    assert truncate.value.message == (
        "`truncate` must be strictly positive and less than 10. Given: 11"
    )
    limits.check_truncate(10)


def test_fits_matches_apply() -> None:
    limits = TokenLimits(10, 20)
    assert limits.fits(10, 10) and limits.fits(10, None)
    assert not limits.fits(11, None) and not limits.fits(10, 11)
