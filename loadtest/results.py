"""What a run measured, per system, and its JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.stats import LevelStats


@dataclass
class SystemResult:
    name: str
    kind: str  # "server" (measured over HTTP) or "in-process" (HF generate at batch 1)
    levels: list[LevelStats] = field(default_factory=list)
    model: str | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # set when the system could not be measured at all
    log_tail: str | None = None

    def level(self, concurrency: int) -> LevelStats | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "levels": [lv.to_dict() for lv in self.levels]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SystemResult:
        fields = dict(data)
        fields["levels"] = [LevelStats.from_dict(lv) for lv in fields.pop("levels")]
        return cls(**fields)


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    systems: list[SystemResult]
    # (system, baseline) pairs whose per-task speedups the tables and plots show.
    speedups: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "machine": self.machine,
            "speedups": [list(pair) for pair in self.speedups],
            "systems": [s.to_dict() for s in self.systems],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            settings=data["settings"],
            machine=data["machine"],
            systems=[SystemResult.from_dict(s) for s in data["systems"]],
            speedups=[(a, b) for a, b in data.get("speedups", [])],
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Report:
        return cls.from_dict(json.loads(path.read_text()))
