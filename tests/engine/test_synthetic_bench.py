from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from engine import synthetic_bench
from engine.config import EngineConfig
from engine.engine import Engine
from engine.synthetic import random_prompts, synthetic_pair
from engine.synthetic_bench import (
    ROUND_LABEL,
    RoundTimer,
    covered,
    device_kernel_seconds,
    merged,
    run_level,
)


def test_merged_joins_overlapping_and_touching_intervals() -> None:
    assert merged([(5, 7), (0, 2), (1, 3), (3, 4), (8, 9)]) == [(0, 4), (5, 7), (8, 9)]


def test_covered_counts_overlaps_once_and_clips_to_windows() -> None:
    windows = [(0.0, 10.0), (20.0, 30.0)]
    busy = [(2.0, 6.0), (4.0, 8.0), (9.0, 22.0), (29.0, 40.0)]
    # (2..8) + (9..10) in the first window, (20..22) + (29..30) in the second.
    assert covered(windows, busy) == pytest.approx(6 + 1 + 2 + 1)


def event(name: str, device: DeviceType, start: float, end: float, annotation: bool = False):
    return SimpleNamespace(
        name=name,
        device_type=device,
        time_range=SimpleNamespace(start=start, end=end),
        is_user_annotation=annotation,
    )


def test_device_kernel_seconds_reads_kernels_inside_rounds() -> None:
    events = [
        event(ROUND_LABEL, DeviceType.CPU, 0, 1000),
        event(ROUND_LABEL, DeviceType.CPU, 2000, 2500),
        # The label's device-side copy spans the gaps between kernels: not kernel time.
        event(ROUND_LABEL, DeviceType.CUDA, 0, 1000, annotation=True),
        event("gemm", DeviceType.CUDA, 100, 400),
        event("gemm", DeviceType.CUDA, 300, 600),  # overlaps the first: counted once
        event("prefill_gemm", DeviceType.CUDA, 1200, 1800),  # between rounds
        event("attention", DeviceType.CUDA, 2400, 2700),  # half inside the second round
        event("aten::mm", DeviceType.CPU, 100, 900),  # host side: not device time
    ]
    seconds, rounds = device_kernel_seconds(events)
    assert rounds == 2
    assert seconds == pytest.approx((500 + 100) / 1e6)


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair("tiny", agreement=0.9, dtype=torch.float32, seed=2)


def test_round_timer_times_rounds_and_forwards_then_detaches(pair) -> None:
    config = EngineConfig(gamma=3, max_slots=2, max_len=96, prefix_cache=False)
    engine = Engine(pair.target, pair.draft, config)
    prompts = random_prompts(2, 30, pair.target.config.vocab_size, seed=1)
    result = run_level(engine, prompts, max_tokens=20)
    assert result.tokens == 40
    assert result.concurrency == 2
    assert result.rounds > 0 and result.row_rounds >= result.rounds
    assert result.accepted > 0
    # On CPU forwards are synchronous: their time is model time, and lies inside the rounds.
    assert result.kernel_seconds is not None
    assert 0 < result.kernel_seconds < result.round_seconds < result.seconds
    assert result.outside_kernels is not None and 0 < result.outside_kernels < 1
    # The wrappers are gone: the engine runs its own methods again.
    assert "_round" not in vars(engine)
    assert "forward" not in vars(engine.target)
    assert engine.proposer is not None and "forward" not in vars(engine.proposer.runner)
    timer = RoundTimer(engine)
    engine.generate(prompts, synthetic_bench.SamplingParams(max_tokens=5, temperature=0))
    assert timer.round_seconds == 0.0  # not attached: nothing counted


def test_main_prints_a_row_per_level_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--shapes", "tiny", "--concurrency", "1", "3", "--prompt-tokens", "24"]
    argv += ["--max-tokens", "12", "--device", "cpu", "--out", str(out)]
    assert synthetic_bench.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["1", "3"]
    report = json.loads(out.read_text())
    assert [level["spec"]["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        # Every request ran to max_tokens: the synthetic models have no end-of-sequence token.
        assert (
            level["spec"]["tokens"]
            == level["target_only"]["tokens"]
            == 12 * level["spec"]["concurrency"]
        )
        assert level["target_only"]["drafted"] == 0


def test_main_refuses_an_agreement_outside_zero_to_one() -> None:
    with pytest.raises(SystemExit) as exit_info:
        synthetic_bench.main(["--shapes", "tiny", "--agreement", "1.5"])
    assert exit_info.value.code == 2
