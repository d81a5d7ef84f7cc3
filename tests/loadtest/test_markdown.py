"""Markdown rendering of reports, and merging reports from separate runs."""

from __future__ import annotations

from pathlib import Path

from loadtest.acceptance import Acceptance
from loadtest.cli import main
from loadtest.markdown import batch1_table, fmt, render, table
from loadtest.results import Report, SystemResult
from loadtest.stats import LevelStats, TaskStats


def level(concurrency: int, tokens_per_s: float, qa: float, rag: float) -> LevelStats:
    return LevelStats(
        label=f"c={concurrency}", concurrency=concurrency, rate=None, requests=4, ok=4, failed=0,
        wall_s=1.0, output_tokens=int(tokens_per_s), tokens_per_s=tokens_per_s,
        ttft_p50=0.05, ttft_p95=0.08, itl_p50=0.01, itl_p95=0.02, e2e_p50=0.5, e2e_p95=0.9,
        token_count="usage", itl_basis="per-token",
        acceptance=Acceptance(drafts=10, draft_tokens=40, accepted=30),
        tasks={"qa": TaskStats(2, int(qa), 1.0), "rag": TaskStats(2, int(rag), 1.0)},
    )  # fmt: skip


def report() -> Report:
    spec = SystemResult("spec", "server", [level(1, 100.0, 120, 80), level(2, 180.0, 100, 60)])
    base = SystemResult("base", "server", [level(1, 50.0, 60, 20), level(2, 90.0, 50, 30)])
    broken = SystemResult("peer", "server", error="exited with code 1", log_tail="Traceback\nboom")
    return Report({"max_tokens": 64}, {"cpus": 2}, [spec, base, broken], [("spec", "base")])


def test_fmt_and_table() -> None:
    assert fmt(None) == "-" and fmt(0.0123, 1e3, 2) == "12.30" and fmt(2, suffix="x") == "2.0x"
    assert table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_render_has_a_table_per_level_and_the_batch1_speedups() -> None:
    text = render(report())
    assert "### c=1" in text and "### c=2" in text
    row = "| spec | 4 | 0 | 100.0 | 50.0 | 80.0 | 10.00 | 20.00 | 0.50 | 0.90 | 75.0% | 4.00 |"
    assert row in text
    assert "**not measured**: exited with code 1" in text and "boom" in text
    batch1 = batch1_table(report().systems, [("spec", "base")])
    assert batch1 is not None
    rows = {line.split(" | ")[0].strip("| "): line for line in batch1.splitlines()}
    assert rows["qa"].endswith("| 2.00x |")
    assert rows["rag"].endswith("| 4.00x |")
    assert rows["overall"].endswith("| 2.50x |")  # (120+80)/2 s over (60+20)/2 s


def test_a_single_system_gets_one_table_of_levels() -> None:
    only = Report({}, {}, [report().systems[0]])
    text = render(only)
    assert "| level | ok |" in text and "| c=2 | 4 | 0 | 180.0 |" in text
    assert "## spec: tok/s per request by task" in text


def test_report_command_merges_runs(tmp_path: Path) -> None:
    ours, peer = tmp_path / "ours" / "report.json", tmp_path / "peer" / "report.json"
    for path, system in ((ours, report().systems[0]), (peer, report().systems[1])):
        path.parent.mkdir()
        Report({}, {}, [system]).save(path)
    out = tmp_path / "merged"
    assert main(["report", str(ours), str(peer), "--out", str(out), "--speedup", "spec:base"]) == 0
    merged = Report.load(out / "report.json")
    assert [s.name for s in merged.systems] == ["spec", "base"]
    assert merged.speedups == [("spec", "base")]
    assert (out / "speedup_per_task.png").stat().st_size > 0
    assert "spec / base" in (out / "report.md").read_text()
