"""``python -m loadtest soak`` for 20 seconds against the real server on tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loadtest.cli import main
from loadtest.soak import Sample, SoakResult, parse_gauges
from tests.server.conftest import make_engine, serve

PROMPTS = [{"task": "t", "turns": [text]} for text in ("hello world", "def f(x):", "the fox")]


def test_soak_reports_memory_slots_and_errors(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    out = tmp_path / "soak"
    with serve(make_engine(max_slots=4, step_delay=0.002), max_queue=4) as running:
        code = main(["soak", "--base-url", running.url, "--minutes", str(20 / 60),
                     "--concurrency", "4", "--sample-every", "2", "--max-tokens", "16",
                     "--prompts", str(prompts), "--endpoint", "completions",
                     "--pid", str(os.getpid()), "--out", str(out)])  # fmt: skip
    report = json.loads((out / "soak.json").read_text())
    assert code == 0 and report["passed"]
    assert report["failed"] == 0 and report["ok"] > 20
    samples = report["samples"]
    assert len(samples) >= 8 and samples[-1]["t"] >= 19
    assert all(s["rss_bytes"] > 2**20 for s in samples)  # this process: the server runs here
    assert max(s["slots_used"] for s in samples) > 0  # sampled under load...
    assert report["settled"]["slots_used"] == 0 and report["drained"]  # ...and drained after
    assert isinstance(report["rss_growth_pct"], float)
    markdown = (out / "soak.md").read_text()
    assert "verdict: **PASS**" in markdown and "RSS growth" in markdown


def test_gauges_are_read_from_the_exposition() -> None:
    text = (
        "# HELP x\nspecserve:kv_slots_used 3.0\nspecserve:num_requests_waiting 0.0\n"
        'specserve:request_success_total{finished_reason="stop"} 4.0\n'
        "process_resident_memory_bytes 1.5e+08\n"
    )
    assert parse_gauges(text) == {"slots_used": 3.0, "waiting": 0.0, "rss_bytes": 1.5e8}


def test_rss_growth_over_the_limit_fails_the_verdict() -> None:
    samples = [Sample(0, 0, 0, rss_bytes=100e6), Sample(5, 9, 0, rss_bytes=130e6)]
    settled = Sample(6, 9, 0, slots_used=0, running=0, waiting=0)
    loose = SoakResult({"max_rss_growth_pct": None}, samples, ok=9, settled=settled)
    strict = SoakResult({"max_rss_growth_pct": 20.0}, samples, ok=9, settled=settled)
    assert loose.rss_growth_pct == pytest.approx(30.0)
    assert loose.passed and not strict.passed
