from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import calibration
from engine.calibration import digest, from_json, load, save, still_holds, to_json
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.gamma import CostModel
from engine.graphs import ForwardGraphs, eager_capture
from engine.runner import ModelRunner, RaggedBatch
from tests.engine.conftest import perturbed, tiny_model

COSTS = CostModel(
    target={1: 0.10, 2: 0.11, 8: 0.19},
    draft={1: 0.012, 2: 0.019},
    draft_catch_up={16: 0.1, 64: 0.36},
    attention=1.5e-7,
    learn=True,
)


def test_figures_survive_the_round_trip_through_json() -> None:
    data = json.loads(json.dumps(to_json(COSTS)))  # int keys become strings on the way
    restored = from_json(data)
    assert restored == COSTS
    assert restored is not None and restored.learn  # a kept table goes on learning


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: d.update(format=calibration.FORMAT + 1),
        lambda d: d.pop("draft"),
        lambda d: d.update(target={}),
        lambda d: d.update(target={"one": 0.1}),
        lambda d: d.update(attention=None),
    ],
)
def test_a_file_of_another_format_or_incomplete_is_no_calibration(
    spoil: Callable[[dict], object],
) -> None:
    data = json.loads(json.dumps(to_json(COSTS)))
    spoil(data)
    assert from_json(data) is None


def test_save_then_load_and_what_cannot_be_read(tmp_path: Path) -> None:
    directory = tmp_path / "calibration"
    assert load(directory, "abc") is None  # nothing kept yet
    save(directory, "abc", COSTS, {"device": "cpu"})
    assert load(directory, "abc") == COSTS
    assert json.loads((directory / "abc.json").read_text())["facts"] == {"device": "cpu"}
    assert [p.name for p in directory.iterdir()] == ["abc.json"]  # no temporary file left
    (directory / "abc.json").write_text("{not json")
    assert load(directory, "abc") is None


def test_the_directory_keeps_the_latest_files_only(tmp_path: Path, monkeypatch) -> None:
    import os

    monkeypatch.setattr(calibration, "KEEP_FILES", 3)
    for index in range(5):
        save(tmp_path, f"key{index}", COSTS, {})
        os.utime(tmp_path / f"key{index}.json", (1000 + index, 1000 + index))
    save(tmp_path, "key1", COSTS, {})  # rewritten: now the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key1.json", "key3.json", "key4.json"]


def test_a_cache_that_cannot_be_written_costs_nothing_but_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    save(blocked, "abc", COSTS, {})  # a directory that is a file: no exception
    assert "could not keep the calibration" in caplog.text


def test_the_digest_names_the_facts() -> None:
    facts = {"threads": 2, "models": {"target": {"hidden": 64}}}
    assert digest(facts) == digest({"models": {"target": {"hidden": 64}}, "threads": 2})
    assert digest(facts) != digest(facts | {"threads": 4})


def test_still_holds_within_the_tolerance_only() -> None:
    table = {1: 0.1, 8: 0.2}
    assert still_holds(table, {1: 0.11, 8: 0.18})
    assert not still_holds(table, {1: 0.1, 8: 0.2 * calibration.TOLERANCE * 1.05})
    assert not still_holds(table, {1: 0.1 / (calibration.TOLERANCE * 1.05)})
    assert not still_holds(table, {4: 0.15})  # a size the table never timed


class FakeTimings:
    """Stands in for the engine's timers: calibrations counted, spot checks answered from a
    table scaled by ``drift`` (1.0: the machine is as it was)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calibrations = 0
        self.checks = 0
        self.drift = 1.0
        monkeypatch.setattr(calibration, "measure_until_linear", self.full)
        monkeypatch.setattr(calibration, "measure", self.some)

    @staticmethod
    def seconds(size: int) -> float:
        return 0.01 + 0.002 * size

    def full(self, forward, sizes, synchronize=None) -> dict[int, float]:
        self.calibrations += 1
        return {size: self.seconds(size) * self.drift for size in sizes}

    def some(self, forward, sizes, repeats=3, synchronize=None) -> dict[int, float]:
        self.checks += 1
        return {size: self.seconds(size) * self.drift for size in sizes}


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.1)


def build(pair, directory: Path | None, **settings) -> Engine:
    chosen = {"gamma": 4, "max_slots": 2, "max_len": 128, "adaptive_gamma": True} | settings
    config = EngineConfig(calibration_cache=None if directory is None else str(directory), **chosen)
    return Engine(pair[0], pair[1], config)


def test_a_second_start_reuses_the_kept_timings(pair, tmp_path: Path, monkeypatch) -> None:
    timings = FakeTimings(monkeypatch)
    first = build(pair, tmp_path)
    assert timings.calibrations == 1 and timings.checks > 0  # draft and catch-up tables
    assert len(list(tmp_path.glob("*.json"))) == 1
    checks = timings.checks
    second = build(pair, tmp_path)
    assert timings.calibrations == 1  # not timed again
    assert timings.checks == checks + 2  # the spot check: verify sizes, then a draft step
    assert second.costs is not None and first.costs is not None
    assert second.costs.target == first.costs.target
    assert second.costs.draft == first.costs.draft
    assert second.costs.draft_catch_up == first.costs.draft_catch_up
    # It decodes as any engine does.
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert second.generate([[5, 6, 7]], params)[0].token_ids == (
        first.generate([[5, 6, 7]], params)[0].token_ids
    )


def test_other_settings_or_a_changed_machine_time_afresh(pair, tmp_path: Path, monkeypatch) -> None:
    timings = FakeTimings(monkeypatch)
    build(pair, tmp_path)
    # Settings no timed forward depends on keep the timings.
    build(pair, tmp_path, prefill_chunk=64, prefix_cache=False, prompt_lookup=2)
    assert timings.calibrations == 1
    build(pair, tmp_path, max_slots=3)  # another verify range: another calibration
    assert timings.calibrations == 2
    assert len(list(tmp_path.glob("*.json"))) == 2
    timings.drift = 2.0  # the machine now runs at half the speed
    slow = build(pair, tmp_path)
    assert timings.calibrations == 3
    assert len(list(tmp_path.glob("*.json"))) == 2  # the stale file was replaced
    build(pair, tmp_path)
    assert timings.calibrations == 3  # the replacement holds
    assert slow.costs is not None


def test_without_a_directory_every_start_calibrates(pair, tmp_path: Path, monkeypatch) -> None:
    timings = FakeTimings(monkeypatch)
    build(pair, None)
    build(pair, None)
    assert timings.calibrations == 2
    assert list(tmp_path.iterdir()) == []


def test_draft_steps_are_timed_through_the_proposers_own_head(pair) -> None:
    # With --draft-vocab the proposer steps through a restricted head; timing the model's full
    # head instead priced every draft step too dear.
    from engine.calibration import calibrate

    config = EngineConfig(gamma=2, max_slots=2, max_len=64, draft_vocab=64)
    engine = Engine(pair[0], pair[1], config)
    assert engine.proposer is not None and engine.proposer.subset is not None
    heads: list[int] = []
    subset_head = engine.proposer.subset_head
    engine.proposer.subset_head = lambda x: heads.append(x.shape[0]) or subset_head(x)
    costs = calibrate(engine.target, engine.proposer, config.max_slots, engine.gamma)
    assert sorted(set(heads)) == sorted(costs.draft)  # each timed size went through it


def test_with_cuda_graphs_a_verify_is_timed_in_rows_as_wide_as_a_rounds() -> None:
    runner = ModelRunner(tiny_model("qwen2"), num_slots=4, capacity=64)
    runner.graphs = ForwardGraphs(runner, max_rows=4, max_width=3, capture=eager_capture)
    probe = calibration._verify_probe(runner)
    for tokens in (1, 3, 7, 12):
        probe(tokens)
    # 7 tokens: rows of 3, 3 and 1 (a four-row graph); 12: four rows of 3. All replayed.
    assert runner.graphs.replays == 4
    assert sorted(runner.graphs.graphs) == [(1, 1, 64), (1, 3, 64), (4, 3, 64)]
    runner.graphs = None  # without graphs (a CPU): one row of them all, as before
    calls: list[RaggedBatch] = []
    original = runner.forward

    def recorded(batch: RaggedBatch, output: str = "last") -> torch.Tensor | None:
        calls.append(batch)
        return original(batch, output)

    runner.forward = recorded  # type: ignore[method-assign]
    calibration._verify_probe(runner)(7)
    assert [b.num_new for b in calls] == [[7]]
