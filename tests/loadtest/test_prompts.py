"""Prompt selection from a Spec-Bench JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.prompts import DEFAULT_PROMPTS, load_prompts


def write(path: Path, items: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(json.dumps({"task": t, "turns": [p, "second turn"]}) + "\n" for t, p in items)
    )
    return path


def test_tasks_are_interleaved_and_bounded(tmp_path: Path) -> None:
    items = [("qa", "q1"), ("qa", "q2"), ("qa", "q3"), ("rag", "r1"), ("rag", "r2"), ("mt", "m1")]
    path = write(tmp_path / "p.jsonl", items)
    assert [p.text for p in load_prompts(path)] == ["q1", "r1", "m1", "q2", "r2", "q3"]
    assert [p.text for p in load_prompts(path, per_task=1)] == ["q1", "r1", "m1"]
    assert [p.text for p in load_prompts(path, limit=2)] == ["q1", "r1"]
    assert [(p.task, p.text) for p in load_prompts(path, per_task=2, limit=4)] == [
        ("qa", "q1"), ("rag", "r1"), ("mt", "m1"), ("qa", "q2"),
    ]  # fmt: skip


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError):
        load_prompts(tmp_path / "e.jsonl")


@pytest.mark.skipif(not DEFAULT_PROMPTS.is_file(), reason="shared Spec-Bench data not present")
def test_default_file_has_every_task_once_per_round() -> None:
    prompts = load_prompts(DEFAULT_PROMPTS, per_task=1)
    assert len(prompts) == len({p.task for p in prompts}) >= 2
