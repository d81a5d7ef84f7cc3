"""The load generator against our real server (uvicorn, tiny random models) end to end."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.cli import main
from loadtest.client import RequestOptions
from loadtest.generator import Level
from loadtest.measure import LoadSettings, measure_server
from loadtest.output import write_report
from loadtest.prompts import load_prompts
from loadtest.results import Report, SystemResult
from tests.server.conftest import RunningServer, make_engine, serve

PROMPTS = [("qa", "hello world"), ("rag", "say hello to the user"), ("qa", "def f(x):")]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve(make_engine(max_slots=2)) as running:
        yield running


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"task": t, "turns": [p]}) + "\n" for t, p in PROMPTS))
    return path


def measure(server: RunningServer, prompts_file: Path, **options: object) -> SystemResult:
    settings = LoadSettings(
        levels=[Level(concurrency=1), Level(concurrency=2)],
        # ignore_eos: a random model may end at once; the counts below need real output.
        options=RequestOptions(max_tokens=6, extra_body={"ignore_eos": True}, **options),  # type: ignore[arg-type]
        num_requests=4,
        warmup=1,
        request_timeout_s=60,
    )
    return asyncio.run(measure_server("ours", server.url, load_prompts(prompts_file), settings))


def test_sweep_against_our_server_writes_the_report(
    server: RunningServer, prompts_file: Path, tmp_path: Path
) -> None:
    result = measure(server, prompts_file)
    assert result.error is None and result.model == "tiny" and result.notes == []
    assert [lv.label for lv in result.levels] == ["c=1", "c=2"]
    for level in result.levels:
        assert (level.requests, level.ok, level.failed) == (4, 4, 0)
        assert level.output_tokens == 4 * 6 and level.tokens_per_s > 0
        assert level.token_count == "usage" and level.itl_basis == "per-token"
        assert level.ttft_p50 is not None and level.itl_p50 is not None
        assert level.e2e_p95 is not None and level.e2e_p95 >= level.e2e_p50  # type: ignore[operator]
        assert set(level.tasks) == {"qa", "rag"} and level.tasks["qa"].requests == 3
        acceptance = level.acceptance
        assert acceptance is not None and acceptance.draft_tokens > 0
        assert acceptance.acceptance_rate is not None and 0 <= acceptance.acceptance_rate <= 1
        assert acceptance.mean_acceptance_length is not None

    baseline = copy.deepcopy(result)
    baseline.name = "ours-again"
    report = Report({"max_tokens": 6}, {"cpus": 1}, [result, baseline], [("ours", "ours-again")])
    out = tmp_path / "out"
    written = write_report(report, out)
    for name in ("report.json", "report.md", "throughput.png", "latency.png", "tasks.png",
                 "speedup_per_task.png"):  # fmt: skip
        assert out / name in written and (out / name).stat().st_size > 0
    assert Report.load(out / "report.json").systems[0].levels[1].ok == 4
    markdown = (out / "report.md").read_text()
    assert "### c=2" in markdown and "| ours | 4 | 0 |" in markdown


def test_completions_endpoint_works_too(server: RunningServer, prompts_file: Path) -> None:
    result = measure(server, prompts_file, endpoint="completions")
    assert all(lv.ok == 4 and lv.output_tokens == 24 for lv in result.levels)


def test_unreachable_server_counts_failures(prompts_file: Path) -> None:
    from loadtest.process import free_port

    settings = LoadSettings(levels=[Level(concurrency=2)], num_requests=3, request_timeout_s=5)
    url = f"http://127.0.0.1:{free_port()}"
    result = asyncio.run(measure_server("nobody", url, load_prompts(prompts_file), settings))
    (level,) = result.levels
    assert (level.ok, level.failed) == (0, 3) and "ConnectError" in level.errors[0]
    assert result.model is None and any("every probe" in note for note in result.notes)


def test_bare_command_line_means_run(
    server: RunningServer, prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code = main([
        "--base-url", f"{server.url}/v1", "--name", "tiny", "--prompts", str(prompts_file),
        "--max-tokens", "4", "--concurrency", "2", "--num-requests", "3", "--warmup", "0",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    (system,) = Report.load(out / "report.json").systems
    assert system.name == "tiny" and system.levels[0].ok == 3
    assert "| c=2 | 3 | 0 |" in (out / "report.md").read_text()
