"""Our speculative-decoding counters, scraped from /metrics around a level and diffed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "specserve:spec_decode_"
COUNTERS = {
    "accepted": PREFIX + "num_accepted_tokens_total",
    "draft_tokens": PREFIX + "num_draft_tokens_total",
    "drafts": PREFIX + "num_drafts_total",
}


@dataclass
class Acceptance:
    drafts: float
    draft_tokens: float
    accepted: float

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per drafting round, the target's own (bonus) token included, as vLLM."""
        return 1 + self.accepted / self.drafts if self.drafts else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Acceptance:
        return cls(data["drafts"], data["draft_tokens"], data["accepted"])


def parse_counters(text: str) -> dict[str, float] | None:
    """The three counters summed over labels, or None if the server does not export them."""
    wanted = {name: key for key, name in COUNTERS.items()}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                found[key] = found.get(key, 0.0) + sample.value
    return found if len(found) == len(COUNTERS) else None


async def scrape(client: httpx.AsyncClient) -> dict[str, float] | None:
    """None for a server without /metrics or without our counters: not an error."""
    try:
        response = await client.get("/metrics", timeout=30)
        if response.status_code != 200:
            return None
        return parse_counters(response.text)
    except (httpx.HTTPError, ValueError):
        return None


def diff(before: dict[str, float] | None, after: dict[str, float] | None) -> Acceptance | None:
    if before is None or after is None:
        return None
    delta = {key: after[key] - before[key] for key in COUNTERS}
    return Acceptance(delta["drafts"], delta["draft_tokens"], delta["accepted"])
