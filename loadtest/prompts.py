"""Spec-Bench prompts from a JSONL file (``task``, ``turns[0]``)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench_dev.jsonl"


@dataclass(frozen=True)
class Prompt:
    task: str
    text: str

    @property
    def key(self) -> str:
        """Names the prompt across systems and runs (its task and a digest of its text), so
        that speedups compare systems on the prompts both finished."""
        return f"{self.task}:{hashlib.sha1(self.text.encode()).hexdigest()[:12]}"


def load_prompts(path: Path, per_task: int | None = None, limit: int | None = None) -> list[Prompt]:
    """The first ``per_task`` prompts of each task, interleaved task by task, then the first
    ``limit``. Interleaving keeps every level's request mix the same whatever the file order,
    and lets a small ``limit`` still cover every task."""
    by_task: dict[str, list[Prompt]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        task = item.get("task") or item.get("category") or "all"
        if per_task is None or len(by_task[task]) < per_task:
            by_task[task].append(Prompt(task, item["turns"][0]))
    rounds = zip_longest(*by_task.values())
    prompts = [p for p in chain.from_iterable(rounds) if p is not None]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts[:limit] if limit is not None else prompts
