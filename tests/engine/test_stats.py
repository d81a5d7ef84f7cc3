from __future__ import annotations

import pytest

from engine.gamma import expected_tokens
from engine.stats import EngineStats


def test_acceptance_starts_at_the_prior() -> None:
    assert EngineStats().model_acceptance(0.7) == pytest.approx(0.7)
    assert EngineStats().ngram_acceptance(0.5) == pytest.approx(0.5)


def test_model_acceptance_is_the_per_token_probability_not_accepted_over_drafted() -> None:
    # Two rounds drafted 8 tokens each, accepted 3 and then hit a rejection: 6 successes and 2
    # failures, alpha 0.75, although only 6 of 16 drafted tokens were accepted.
    stats = EngineStats(drafted=16, accepted=6, rejections=2)
    assert stats.model_acceptance(0.0, weight=0.0) == pytest.approx(0.75)
    # accepted / drafted would have predicted ~1.6 tokens a round where these rounds gave 4.
    assert expected_tokens(stats.acceptance_rate, 8) < 2 < expected_tokens(0.75, 8)


def test_prompt_lookup_evidence_is_kept_apart() -> None:
    stats = EngineStats(
        drafted=20, accepted=10, rejections=3, ngram_drafted=8, ngram_accepted=2, ngram_rejections=2
    )
    assert stats.model_acceptance(0.0, weight=0.0) == pytest.approx(8 / 9)
    assert stats.ngram_acceptance(0.0, weight=0.0) == pytest.approx(0.5)
    # Twenty pseudo-observations of the prior weigh against the few real ones.
    assert stats.model_acceptance(0.5) == pytest.approx((8 + 10) / (9 + 20))
