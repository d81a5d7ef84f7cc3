"""Markdown rendering of reports, and merging reports from separate runs."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.acceptance import Acceptance
from loadtest.cli import main
from loadtest.markdown import batch1_table, fmt, render, table
from loadtest.prompts import Prompt
from loadtest.records import RequestRecord
from loadtest.results import Report, SystemResult
from loadtest.stats import LevelStats, TaskStats, summarise


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


def test_speedups_compare_only_the_prompts_both_systems_finished(tmp_path: Path) -> None:
    """A baseline cut off by the time bound after one prompt per task: its speed on that
    prompt against ours on the same one, not against ours over every prompt."""
    prompts = [Prompt("qa", "short"), Prompt("qa", "long"), Prompt("rag", "doc")]

    def records(seconds: list[float]) -> list[RequestRecord]:
        done = []
        for prompt, took in zip(prompts, seconds, strict=False):
            record = RequestRecord(prompt.task, True, 0.0, took, output_tokens=10)
            record.prompt = prompt.key
            done.append(record)
        return done

    ours = SystemResult("ours", "server", [summarise(records([0.5, 2.0, 4.0]), 6.5, "c=1", 1)])
    # The baseline finished the first qa prompt only: 2x slower than ours on it.
    hf = SystemResult("hf", "in-process", [summarise(records([1.0]), 1.0, "c=1", 1)])
    assert set(ours.levels[0].prompts) == {p.key for p in prompts}
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in (batch1_table([ours, hf], [("ours", "hf")]) or "").splitlines()
    }
    assert rows["qa"].endswith("| 2.00x |") and rows["overall"].endswith("| 2.00x |")
    assert rows["rag"].endswith("| - |")  # nothing in common
    # Without per-prompt figures (a report from before them) the task totals are compared:
    # ours 20 tokens in 2.5 s on qa against hf's 10 in 1 s.
    path = tmp_path / "report.json"
    Report({}, {}, [ours, hf]).save(path)
    data = json.loads(path.read_text())
    for system in data["systems"]:
        del system["levels"][0]["prompts"]
    path.write_text(json.dumps(data))
    old = Report.load(path).systems
    assert old[0].levels[0].prompts == {}
    assert (batch1_table(old, [("ours", "hf")]) or "").count("| 0.80x |") == 1


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
