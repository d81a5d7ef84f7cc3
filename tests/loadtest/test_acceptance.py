"""Scraped speculative-decoding counters: parsing, diffing, derived figures."""

from __future__ import annotations

import pytest

from loadtest.acceptance import Acceptance, diff, parse_counters

EXPOSITION = """\
# HELP specserve:spec_decode_num_drafts_total Row-rounds that drafted.
# TYPE specserve:spec_decode_num_drafts_total counter
specserve:spec_decode_num_drafts_total 10.0
# TYPE specserve:spec_decode_num_draft_tokens_total counter
specserve:spec_decode_num_draft_tokens_total 40.0
# TYPE specserve:spec_decode_num_accepted_tokens_total counter
specserve:spec_decode_num_accepted_tokens_total 25.0
# TYPE specserve:spec_decode_num_accepted_tokens_per_pos_total counter
specserve:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 9.0
# TYPE other_total counter
other_total{a="1"} 3.0
"""


def test_parse_counters_reads_our_three_counters() -> None:
    assert parse_counters(EXPOSITION) == {"drafts": 10.0, "draft_tokens": 40.0, "accepted": 25.0}


def test_a_server_without_them_is_skipped() -> None:
    assert parse_counters("# TYPE x_total counter\nx_total 1.0\n") is None
    assert parse_counters("") is None
    assert diff(None, {"drafts": 1.0, "draft_tokens": 1.0, "accepted": 1.0}) is None


def test_diff_gives_the_level_s_acceptance() -> None:
    before = {"drafts": 10.0, "draft_tokens": 40.0, "accepted": 25.0}
    after = {"drafts": 30.0, "draft_tokens": 120.0, "accepted": 85.0}
    acc = diff(before, after)
    assert acc == Acceptance(drafts=20.0, draft_tokens=80.0, accepted=60.0)
    assert acc.acceptance_rate == pytest.approx(0.75)
    assert acc.mean_acceptance_length == pytest.approx(4.0)
    assert Acceptance.from_dict(acc.to_dict()) == acc


def test_no_drafting_means_no_figures() -> None:
    idle = Acceptance(0.0, 0.0, 0.0)
    assert idle.acceptance_rate is None and idle.mean_acceptance_length is None
