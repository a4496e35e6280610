"""The shared field rules; here the JSON guard every door parses through (properties)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from json_strategies import json_values
from rillet.errors import ValidationError
from rillet.server.dialects.fields import MAX_JSON_DEPTH, json_loads


@given(value=json_values)
def test_within_the_depth_it_is_json_loads(value: Any) -> None:
    raw = json.dumps(value, ensure_ascii=False)
    assert json_loads(raw) == value and json_loads(raw.encode()) == value


@given(depth=st.integers(0, 3 * MAX_JSON_DEPTH), kind=st.sampled_from(["list", "object"]))
def test_the_depth_limit_is_exact(depth: int, kind: str) -> None:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    raw = json.dumps(value)
    if depth <= MAX_JSON_DEPTH:
        assert json_loads(raw) == value
    else:
        with pytest.raises(ValidationError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
            json_loads(raw)


@given(
    raw=st.text(alphabet='[]{}"\\:, a1', max_size=4000)
    | st.binary(max_size=200)
    | st.builds(lambda n, tail: "[" * n + tail, st.integers(0, 5000), st.text(max_size=20))
)
@settings(max_examples=300)
def test_any_input_parses_or_is_refused_cleanly(raw: str | bytes) -> None:
    # Never a RecursionError or anything else a door would turn into a 500.
    with contextlib.suppress(ValueError, ValidationError):
        json_loads(raw)
