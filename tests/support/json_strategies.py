"""Hypothesis strategies for JSON values (shared by the property tests of the SSE framing and
of the JSON body guard)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

#: JSON values as Python has them: no floats (NaN is not JSON, and 0.1 need not round-trip
#: through another encoder), any text, nested a few levels.
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
