"""Per-level statistics from request records: percentiles, throughput, per-task speed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.acceptance import Acceptance
from loadtest.records import RequestRecord

MAX_ERRORS = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class TaskStats:
    """Per-request decoding speed of one task: tokens over the time its requests took, summed.
    At batch 1 this is new tokens / wall time per prompt, aggregated, as for HF ``generate``;
    under load it is the speed each user sees, not a share of the server's throughput."""

    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "tokens_per_s": self.tokens_per_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskStats:
        return cls(data["requests"], data["tokens"], data["seconds"])


def task_breakdown(records: Iterable[RequestRecord]) -> dict[str, TaskStats]:
    return _breakdown(records, lambda record: record.task)


def prompt_breakdown(records: Iterable[RequestRecord]) -> dict[str, TaskStats]:
    """The same per prompt (``Prompt.key``, which starts with the task)."""
    return _breakdown((r for r in records if r.prompt is not None), lambda r: str(r.prompt))


def _breakdown(
    records: Iterable[RequestRecord], key: Callable[[RequestRecord], str]
) -> dict[str, TaskStats]:
    groups: dict[str, TaskStats] = {}
    for record in records:
        if not record.ok:
            continue
        stats = groups.setdefault(key(record), TaskStats())
        stats.requests += 1
        stats.tokens += record.output_tokens
        stats.seconds += record.e2e
    return dict(sorted(groups.items()))


def overall(tasks: dict[str, TaskStats]) -> TaskStats:
    return TaskStats(
        sum(t.requests for t in tasks.values()),
        sum(t.tokens for t in tasks.values()),
        sum(t.seconds for t in tasks.values()),
    )


def _basis(flags: list[bool], yes: str, no: str) -> str | None:
    if not flags:
        return None
    return yes if all(flags) else no if not any(flags) else "mixed"


@dataclass
class LevelStats:
    label: str
    concurrency: int | None
    rate: float | None
    requests: int
    ok: int
    failed: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p95: float | None
    itl_p50: float | None
    itl_p95: float | None
    e2e_p50: float | None
    e2e_p95: float | None
    token_count: str | None  # "usage" (exact) or "chunks" (one token per content chunk)
    itl_basis: str | None  # "per-token" (per-chunk usage known) or "per-chunk"
    acceptance: Acceptance | None = None
    tasks: dict[str, TaskStats] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Per prompt (Prompt.key): what speedups between systems are computed over.
    prompts: dict[str, TaskStats] = field(default_factory=dict)
    # Each request in the order it was sent (REQUEST_FIELDS): what the percentiles summarise,
    # kept so that a median can be traced to the requests behind it.
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["acceptance"] = self.acceptance.to_dict() if self.acceptance else None
        data["tasks"] = {name: t.to_dict() for name, t in self.tasks.items()}
        data["prompts"] = {key: p.to_dict() for key, p in self.prompts.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelStats:
        fields = dict(data)
        acceptance = fields.pop("acceptance")
        fields["acceptance"] = Acceptance.from_dict(acceptance) if acceptance else None
        fields["tasks"] = {n: TaskStats.from_dict(t) for n, t in fields.pop("tasks").items()}
        # Reports written before per-prompt figures have none.
        prompts = fields.pop("prompts", None) or {}
        fields["prompts"] = {k: TaskStats.from_dict(p) for k, p in prompts.items()}
        fields["records"] = fields.pop("records", None) or []  # none before they were kept
        return cls(**fields)


def summarise(
    records: list[RequestRecord],
    wall_s: float,
    label: str,
    concurrency: int | None = None,
    rate: float | None = None,
    acceptance: Acceptance | None = None,
) -> LevelStats:
    """Throughput is successful output tokens over the level's wall time."""
    good = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttft = [r.ttft for r in good if r.ttft is not None]
    itl = [gap for r in good for gap in r.itl]
    e2e = [r.e2e for r in good]
    streamed = [r for r in good if r.ttft is not None]
    errors = list(dict.fromkeys(r.error for r in records if r.error))[:MAX_ERRORS]
    return LevelStats(
        label=label,
        concurrency=concurrency,
        rate=rate,
        requests=len(records),
        ok=len(good),
        failed=len(records) - len(good),
        wall_s=wall_s,
        output_tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50=percentile(ttft, 50),
        ttft_p95=percentile(ttft, 95),
        itl_p50=percentile(itl, 50),
        itl_p95=percentile(itl, 95),
        e2e_p50=percentile(e2e, 50),
        e2e_p95=percentile(e2e, 95),
        token_count=_basis([r.exact_tokens for r in good], "usage", "chunks"),
        itl_basis=_basis([r.per_token_itl for r in streamed], "per-token", "per-chunk"),
        acceptance=acceptance,
        tasks=task_breakdown(records),
        errors=[str(e) for e in errors],
        prompts=prompt_breakdown(records),
        records=[request_fields(r) for r in sorted(records, key=lambda r: r.start)],
    )


def request_fields(record: RequestRecord) -> dict[str, Any]:
    """One request as the report keeps it: times in seconds from its own start."""
    return {
        "prompt": record.prompt,
        "task": record.task,
        "ok": record.ok,
        "ttft": record.ttft,
        "e2e": record.e2e,
        "output_tokens": record.output_tokens,
        "error": record.error,
    }
