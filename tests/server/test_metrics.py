"""/metrics' text: the engine's speculation counters by proposer."""

from __future__ import annotations

from fake_engine import engine_stats
from rillet.server.metrics import ServerMetrics


def test_speculation_counters_by_proposer() -> None:
    metrics = ServerMetrics()
    text = metrics.render(engine_stats(), 0, 0).decode()
    assert "rillet_spec_decode_draft_tokens_total{" not in text  # off: no series
    stats = engine_stats(
        1, 0, 0.1, num_draft_tokens={"ngram": 40}, num_accepted_tokens={"ngram": 31}
    )
    text = metrics.render(stats, 1, 0).decode()
    assert 'rillet_spec_decode_draft_tokens_total{proposer="ngram"} 40.0' in text
    assert 'rillet_spec_decode_accepted_tokens_total{proposer="ngram"} 31.0' in text
