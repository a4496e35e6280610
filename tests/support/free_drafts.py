"""A speculator whose drafts cost nothing, measured or not, for tests of the draft-model
proposer: they are about correctness, and two tiny models of one size (or a model drafting
for itself) would never pay for each other under the real policy."""

from __future__ import annotations

import dataclasses

from rillet.engine.speculation import Speculator


class FreeDrafts(Speculator):
    """Every draft pays: costs zeroed, the rate gate off, the engine's measurements ignored."""

    def observe_draft_forwards(self, *args: float) -> None:
        pass


def free_speculator(spec: Speculator | None, **overrides: object) -> FreeDrafts:
    """A :class:`FreeDrafts` of ``spec``'s config (a draft model's), with ``overrides``."""
    assert spec is not None and spec.drafts_in_runner
    config = dataclasses.replace(
        spec.config,
        row_cost=0.0,
        row_cost_per_1k=0.0,
        draft_cost=0.0,
        judge_by_rates=False,
        **overrides,  # type: ignore[arg-type]
    )
    return FreeDrafts(config)
