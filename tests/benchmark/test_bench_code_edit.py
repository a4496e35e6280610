"""``rillet bench --code-edit``: the prompts, and the acceptance read from ``/metrics``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rillet.benchmark import spec_metrics
from rillet.benchmark.code_edit import CodeEditPrompts

SOURCE = Path(__file__).resolve().parents[2] / "bench/data/code_edit_block_manager.py"


def test_each_request_renames_another_function_of_the_whole_file() -> None:
    prompts = CodeEditPrompts(SOURCE)
    source = SOURCE.read_text()
    texts = [prompts(i).messages[0]["content"] for i in range(len(prompts.names) + 1)]
    assert all(source in text for text in texts)
    assert texts[0].startswith("Rename the function `hash_block` to `hash_block_v2`")
    assert "`num_free_blocks` to `num_free_blocks_v2`" in texts[1]  # no dunders
    # The instruction comes first: requests differ within their first words, so no
    # prefix cache serves one request's file from another's.
    assert len({text[:40] for text in texts[:-1]}) == len(prompts.names)
    assert texts[-1] != texts[0] and "_v3`" in texts[-1]  # the next round renames anew


def test_a_file_without_functions_or_missing_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines no function"):
        CodeEditPrompts(empty)
    with pytest.raises(ValueError, match="cannot read"):
        CodeEditPrompts(tmp_path / "missing.py")


def test_acceptance_is_the_change_of_the_summed_counters() -> None:
    page = (
        "# HELP rillet_spec_decode_draft_tokens_total Draft tokens proposed, by proposer\n"
        'rillet_spec_decode_draft_tokens_total{proposer="ngram"} 100.0\n'
        'rillet_spec_decode_accepted_tokens_total{proposer="ngram"} 60.0\n'
        "rillet_requests_total 3.0\n"
    )
    before = spec_metrics.parse(page)
    after = spec_metrics.parse(page.replace("100.0", "180.0").replace("60.0", "120.0"))
    assert before is not None and after is not None
    assert after.since(before) == {"spec_draft_tokens": 80.0, "spec_acceptance": 0.75}
    assert after.since(after) == {"spec_draft_tokens": 0}
    assert spec_metrics.parse("rillet_requests_total 3.0\n") is None  # no speculation metrics
