from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from engine.bench import (
    draft_agreement,
    draft_context,
    forward_times,
    load_prompts,
    parse_window,
    run_engine,
    summarise_sampled,
)
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from tests.engine.conftest import perturbed, tiny_model


def test_forward_times_reports_each_model_and_shape() -> None:
    target, draft = tiny_model("qwen2"), tiny_model("qwen2", seed=1, layers=1)
    engine = Engine(target, draft, EngineConfig(gamma=3, max_slots=4, max_len=64))
    # The draft is timed through the head its steps use (the proposer's), not its runner's.
    assert engine.proposer is not None
    drafted: list[int] = []
    logits = engine.proposer.logits
    engine.proposer.logits = lambda batch: drafted.append(len(batch.slots)) or logits(batch)
    table = forward_times(engine, context=20, calls=2).splitlines()
    assert sorted(set(drafted)) == [1, 2, 4]
    # Shapes with more rows than the engine has slots are left out.
    assert table[0] == (
        "| model | 1 row x 1 tok | 1 row x 2 tok | 1 row x 4 tok | 2 row x 1 tok | 4 row x 1 tok |"
    )
    assert [line.split("|")[1].strip() for line in table[2:]] == ["target", "draft"]
    for line in table[2:]:
        times = [float(ms) for ms in re.findall(r"([\d.]+) ms", line)]
        assert len(times) == 5 and all(t > 0 for t in times)
    without_draft = Engine(target, None, EngineConfig(gamma=0, max_slots=4, max_len=64))
    assert len(forward_times(without_draft, context=20, calls=1).splitlines()) == 3


def test_draft_agreement_is_total_for_a_draft_equal_to_the_target() -> None:
    target, other = tiny_model("qwen2"), tiny_model("qwen2", seed=1, layers=1)
    prompts = [("a", [5, 6, 7, 8, 9, 10]), ("b", [3, 4, 5])]
    config = EngineConfig(gamma=3, max_slots=1, max_len=64, prefix_cache=False)
    windows = [(0, 0), (0, 2), (1, 2)]
    same = draft_agreement(Engine(target, target, config), prompts, windows, max_tokens=8)
    header, _, *rows = same.splitlines()
    assert header == "| draft window | a | b | overall |"
    # The whole context: the draft is the target, so it agrees everywhere.
    assert rows[0] == "| all | 100.0% | 100.0% | 100.0% |"
    assert rows[1].startswith("| 2 |") and rows[2].startswith("| 1+2 |")
    unrelated = draft_agreement(Engine(target, other, config), prompts, [(0, 0)], max_tokens=8)
    assert _overall(unrelated.splitlines()[2]) < 100


def _overall(row: str) -> float:
    return float(row.split("|")[-2].strip().rstrip("%"))


def test_draft_agreement_with_a_restricted_head_counts_only_the_kept_ids() -> None:
    target = tiny_model("qwen2")
    prompts = [("a", [5, 6, 7, 8, 9, 10]), ("b", [3, 4, 5])]
    config = EngineConfig(gamma=3, max_slots=1, max_len=64, prefix_cache=False)
    engine = Engine(target, target, config)
    params = SamplingParams(max_tokens=8, temperature=0)
    continuations = [engine.generate([ids], params)[0].token_ids for _, ids in prompts]
    # A head of the first `size` ids and the context's tokens agrees exactly where the
    # target's token is one of them.
    tokens = [t for c in continuations for t in c]
    size = sorted(tokens)[len(tokens) // 2]
    kept = set(range(size)) | engine.special_ids
    scored = [
        t in kept or t in prompt or t in continuation[:position]
        for (_, prompt), continuation in zip(prompts, continuations, strict=True)
        for position, t in enumerate(continuation)
    ]
    expected = sum(scored) / len(scored) * 100
    table = draft_agreement(engine, prompts, [(0, 0)], 8, vocabs=(0, size))
    full, restricted = table.splitlines()[2:]
    assert full.startswith("| all |") and _overall(full) == 100
    assert restricted.startswith(f"| all, first {size} ids |")
    assert 0 < _overall(restricted) < 100
    assert _overall(restricted) == pytest.approx(expected, abs=0.05)


def test_draft_windows_parse_and_keep_the_head_and_the_tail() -> None:
    assert parse_window("0") == (0, 0)
    assert parse_window("256") == (0, 256)
    assert parse_window("128+192") == (128, 192)
    ids = list(range(10))
    assert draft_context(ids, 0, 0) == ids
    assert draft_context(ids, 0, 3) == [7, 8, 9]
    assert draft_context(ids, 2, 3) == [0, 1, 7, 8, 9]
    assert draft_context(ids, 4, 6) == ids  # nothing to skip


def test_prompts_are_taken_per_task_and_from_the_chosen_tasks(tmp_path: Path) -> None:
    lines = [
        {"task": "qa", "turns": ["q1"]},
        {"task": "rag", "turns": ["r1"]},
        {"task": "qa", "turns": ["q2"]},
        {"task": "math", "turns": ["m1"]},
        {"task": "rag", "turns": ["r2"]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert load_prompts(path, 1) == [("qa", "q1"), ("rag", "r1"), ("math", "m1")]
    assert load_prompts(path, None, {"rag", "math"}) == [
        ("rag", "r1"),
        ("math", "m1"),
        ("rag", "r2"),
    ]
    assert load_prompts(path, 1, {"rag"}) == [("rag", "r1")]


def test_draft_agreement_of_a_restricted_engine_head_counts_its_context_tokens() -> None:
    # The engine's own restricted head (size 0 in the table) scores the context's tokens as
    # serving does: it agrees exactly as often as the same restriction applied to a full head.
    target = tiny_model("qwen2")
    prompts = [("a", [5, 6, 7, 8, 9, 10]), ("b", [3, 4, 5])]
    config = EngineConfig(gamma=3, max_slots=1, max_len=64, prefix_cache=False)
    full = draft_agreement(Engine(target, target, config), prompts, [(0, 0)], 8, vocabs=(0, 100))
    restricted_engine = Engine(target, target, replace(config, draft_vocab=100))
    own = draft_agreement(restricted_engine, prompts, [(0, 0)], 8)
    assert own.splitlines()[2].split("|")[2:] == full.splitlines()[3].split("|")[2:]


def test_sampled_runs_repeat_and_the_coupled_one_is_target_only_sampling() -> None:
    target = tiny_model("qwen2")
    draft = perturbed(target, 0.1)
    config = EngineConfig(gamma=4, max_slots=1, max_len=96, prefix_cache=False)
    baseline, speculative = Engine(target, None, config), Engine(target, draft, config)
    prompts = [("a", [5, 6, 7, 8]), ("a", [9, 10]), ("b", [11, 12, 13])]
    rows = []
    for index, (task, ids) in enumerate(prompts):
        seed = 40 + index
        row = {
            "task": task,
            "target": run_engine(baseline, ids, 24, 0.9, seed),
            "spec": run_engine(speculative, ids, 24, 0.9, seed, coupled=True),
            "spec_rejection": run_engine(speculative, ids, 24, 0.9, seed, coupled=False),
        }
        again = run_engine(speculative, ids, 24, 0.9, seed, coupled=False)
        assert again["token_ids"] == row["spec_rejection"]["token_ids"]  # the seed replays
        row["identical"] = row["target"]["token_ids"] == row["spec"]["token_ids"]
        assert row["identical"]
        rows.append(row)
    assert any(r["spec"]["token_ids"] != r["spec_rejection"]["token_ids"] for r in rows)
    table = summarise_sampled(rows).splitlines()
    assert table[0].startswith("| task | n | target tok/s | coupled tok/s | rejection tok/s |")
    cells = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[2:]}
    assert list(cells) == ["a", "b", "overall"]
    assert cells["a"][0].strip() == "2" and cells["overall"][-1].strip() == "3/3"
    for system, column in (("spec", 6), ("spec_rejection", 7)):
        drafted = sum(r[system]["drafted"] for r in rows)
        accepted = sum(r[system]["accepted"] for r in rows)
        assert cells["overall"][column].strip() == f"{accepted / drafted:.1%}"
