"""Speculative decoding's acceptance during a level, from the server's ``/metrics``.

rillet exposes ``rillet_spec_decode_draft_tokens_total`` and
``rillet_spec_decode_accepted_tokens_total`` (per proposer); a level's acceptance is the
change of their sums across it. Servers without them (other peers, speculation off) give
None, and the row says nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

_DRAFTS = "rillet_spec_decode_draft_tokens_total"
_ACCEPTED = "rillet_spec_decode_accepted_tokens_total"


@dataclass(frozen=True)
class SpecCounts:
    drafts: float
    accepted: float

    def since(self, before: SpecCounts) -> dict[str, float]:
        """The level's fields: drafts proposed, and the share accepted."""
        drafts = self.drafts - before.drafts
        accepted = self.accepted - before.accepted
        if drafts <= 0:
            return {"spec_draft_tokens": 0}
        return {"spec_draft_tokens": drafts, "spec_acceptance": round(accepted / drafts, 4)}


def parse(text: str) -> SpecCounts | None:
    """The summed counters of a Prometheus text page, or None when it has neither."""
    sums = {_DRAFTS: 0.0, _ACCEPTED: 0.0}
    seen = False
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
            seen = True
    return SpecCounts(sums[_DRAFTS], sums[_ACCEPTED]) if seen else None


async def scrape(base_url: str, headers: dict[str, str]) -> SpecCounts | None:
    """The server's counters now; None when it has no such metrics or does not answer."""
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(f"{base_url}/metrics", headers=headers)
    except httpx.HTTPError:
        return None
    return parse(response.text) if response.status_code == 200 else None
