"""Percentiles, throughput and per-task aggregation."""

from __future__ import annotations

import pytest

from loadtest.records import RequestRecord
from loadtest.stats import LevelStats, TaskStats, overall, percentile, summarise


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def record(task: str, tokens: int, start: float, end: float, ok: bool = True) -> RequestRecord:
    return RequestRecord(
        task, ok, start, end, error=None if ok else "boom", ttft=0.1 if ok else None,
        output_tokens=tokens if ok else 0, exact_tokens=True, per_token_itl=True,
        itl=[0.01] * max(tokens - 1, 0) if ok else [],
    )  # fmt: skip


def test_summarise_counts_only_successes_over_the_wall_time() -> None:
    records = [
        record("qa", 10, 0.0, 1.0),
        record("qa", 30, 0.0, 2.0),
        record("rag", 20, 1.0, 2.0),
        record("rag", 0, 1.0, 1.5, ok=False),
    ]
    stats = summarise(records, wall_s=2.0, label="c=2", concurrency=2)
    assert (stats.requests, stats.ok, stats.failed) == (4, 3, 1)
    assert stats.output_tokens == 60
    assert stats.tokens_per_s == pytest.approx(30.0)
    assert stats.e2e_p50 == pytest.approx(1.0)
    assert stats.ttft_p50 == pytest.approx(0.1)
    assert stats.itl_p95 == pytest.approx(0.01)
    assert stats.token_count == "usage" and stats.itl_basis == "per-token"
    assert stats.errors == ["boom"]
    assert stats.tasks["qa"].tokens_per_s == pytest.approx(40 / 3)
    assert stats.tasks["rag"].requests == 1  # the failure is not part of the task's speed
    assert overall(stats.tasks) == TaskStats(3, 60, 4.0)


def test_basis_reports_chunk_counting_and_mixtures() -> None:
    exact = record("qa", 4, 0.0, 1.0)
    counted = record("qa", 4, 0.0, 1.0)
    counted.exact_tokens = counted.per_token_itl = False
    assert summarise([counted], 1.0, "c=1").token_count == "chunks"
    mixed = summarise([exact, counted], 1.0, "c=1")
    assert mixed.token_count == "mixed" and mixed.itl_basis == "mixed"
    empty = summarise([], 0.0, "c=1")
    assert empty.tokens_per_s == 0.0 and empty.token_count is None and empty.ttft_p50 is None


def test_level_stats_round_trip_through_dicts() -> None:
    stats = summarise([record("qa", 5, 0.0, 1.0)], 1.0, "c=1", concurrency=1)
    assert LevelStats.from_dict(stats.to_dict()) == stats


def test_each_request_is_kept_in_sending_order() -> None:
    late = record("rag", 20, 1.0, 2.5)
    late.prompt = "rag:abc"
    early = record("qa", 10, 0.0, 1.0)
    failed = record("qa", 0, 0.5, 0.7, ok=False)
    stats = summarise([late, early, failed], wall_s=2.5, label="c=2", concurrency=2)
    assert [r["task"] for r in stats.records] == ["qa", "qa", "rag"]
    assert stats.records[2] == {
        "prompt": "rag:abc", "task": "rag", "ok": True, "ttft": 0.1, "e2e": 1.5,
        "output_tokens": 20, "error": None,
    }  # fmt: skip
    assert stats.records[1]["ok"] is False and stats.records[1]["error"] == "boom"
    # A report written before requests were kept still loads.
    old = stats.to_dict()
    del old["records"]
    assert LevelStats.from_dict(old).records == []
