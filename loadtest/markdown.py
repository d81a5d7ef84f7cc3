"""Markdown rendering of a report: a table per level, the batch-1 per-task table, notes."""

from __future__ import annotations

from collections.abc import Sequence

from loadtest.results import Report, SystemResult
from loadtest.stats import LevelStats, TaskStats, overall

LOG_TAIL_LINES = 15


def fmt(value: float | None, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


LEVEL_HEADER = [
    "ok", "failed", "out tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
    "E2E p50 s", "E2E p95 s", "accept", "tok/round",
]  # fmt: skip


def level_cells(stats: LevelStats) -> list[str]:
    acc = stats.acceptance
    return [
        str(stats.ok),
        str(stats.failed),
        fmt(stats.tokens_per_s),
        fmt(stats.ttft_p50, 1e3),
        fmt(stats.ttft_p95, 1e3),
        fmt(stats.itl_p50, 1e3, 2),
        fmt(stats.itl_p95, 1e3, 2),
        fmt(stats.e2e_p50, digits=2),
        fmt(stats.e2e_p95, digits=2),
        fmt(acc.acceptance_rate if acc else None, 100, 1, "%"),
        fmt(acc.mean_acceptance_length if acc else None, digits=2),
    ]


def level_tables(systems: list[SystemResult]) -> str:
    """One table per level across systems; a single system gets one table of its levels."""
    measured = [s for s in systems if s.levels]
    if len(measured) == 1:
        only = measured[0]
        return table(["level", *LEVEL_HEADER], [[lv.label, *level_cells(lv)] for lv in only.levels])
    labels = list(dict.fromkeys(lv.label for s in measured for lv in s.levels))
    parts = []
    for label in labels:
        rows = [
            [s.name, *level_cells(lv)] for s in measured for lv in s.levels if lv.label == label
        ]
        parts.append(f"### {label}\n\n" + table(["system", *LEVEL_HEADER], rows))
    return "\n\n".join(parts)


def _batch1_levels(systems: list[SystemResult]) -> dict[str, LevelStats]:
    """Each system's concurrency-1 level, where it has one."""
    levels = {system.name: system.level(1) for system in systems}
    return {name: level for name, level in levels.items() if level is not None}


def batch1_rates(systems: list[SystemResult]) -> dict[str, dict[str, TaskStats]]:
    """Per system with a concurrency-1 level: its tasks plus "overall"."""
    return {
        name: {**level.tasks, "overall": overall(level.tasks)}
        for name, level in _batch1_levels(systems).items()
        if level.tasks
    }


def batch1_prompts(systems: list[SystemResult]) -> dict[str, dict[str, TaskStats]]:
    """Per system with a concurrency-1 level: its figures per prompt (``Prompt.key``)."""
    return {name: level.prompts for name, level in _batch1_levels(systems).items() if level.prompts}


def speedup(
    rates: dict[str, dict[str, TaskStats]],
    pair: tuple[str, str],
    task: str,
    prompts: dict[str, dict[str, TaskStats]] | None = None,
) -> float | None:
    """``pair[0]``'s tok/s over ``pair[1]``'s on ``task`` ("overall": every task). With per-prompt
    figures for both, over the prompts both finished only: a baseline that the time bound cut
    off after 3 of 12 prompts is otherwise compared on other prompts (long RAG ones against
    short ones) and the ratio means nothing."""
    fast_prompts = (prompts or {}).get(pair[0])
    slow_prompts = (prompts or {}).get(pair[1])
    if fast_prompts and slow_prompts:
        common = [
            key
            for key in fast_prompts
            if key in slow_prompts and task in ("overall", key.rpartition(":")[0])
        ]
        fast = overall({key: fast_prompts[key] for key in common}) if common else None
        slow = overall({key: slow_prompts[key] for key in common}) if common else None
    else:
        fast = rates.get(pair[0], {}).get(task)
        slow = rates.get(pair[1], {}).get(task)
    if fast is None or slow is None or not fast.tokens_per_s or not slow.tokens_per_s:
        return None
    return fast.tokens_per_s / slow.tokens_per_s


def batch1_table(systems: list[SystemResult], pairs: list[tuple[str, str]]) -> str | None:
    rates = batch1_rates(systems)
    if not rates:
        return None
    prompts = batch1_prompts(systems)
    pairs = [p for p in pairs if p[0] in rates and p[1] in rates]
    tasks = sorted({t for per_task in rates.values() for t in per_task} - {"overall"})
    header = ["task", "n", *(f"{name} tok/s" for name in rates)]
    header += [f"{a} / {b}" for a, b in pairs]
    rows = []
    for task in [*tasks, "overall"]:
        counts = [per_task[task].requests for per_task in rates.values() if task in per_task]
        cells = [task, str(max(counts, default=0))]
        cells += [fmt(per_task[task].tokens_per_s if task in per_task else None, digits=2)
                  for per_task in rates.values()]  # fmt: skip
        cells += [fmt(speedup(rates, pair, task, prompts), digits=2, suffix="x") for pair in pairs]
        rows.append(cells)
    return table(header, rows)


def task_table(system: SystemResult) -> str:
    """Per-request tok/s of each task at each level of one system."""
    tasks = sorted({t for lv in system.levels for t in lv.tasks})
    rows = []
    for task in [*tasks, "overall"]:
        cells = [task]
        for level in system.levels:
            stats = overall(level.tasks) if task == "overall" else level.tasks.get(task)
            cells.append(fmt(stats.tokens_per_s if stats else None, digits=2))
        rows.append(cells)
    return table(["task", *(lv.label for lv in system.levels)], rows)


def system_notes(system: SystemResult) -> str:
    head = f"- **{system.name}** ({system.kind}"
    head += f", model `{system.model}`)" if system.model else ")"
    lines = [head]
    lines += [f"  - {note}" for note in system.notes]
    for level in system.levels:
        if level.token_count in ("chunks", "mixed"):
            lines.append(f"  - {level.label}: output tokens counted as content chunks "
                         f"({level.token_count}): the stream carried no usage")  # fmt: skip
        lines += [f"  - {level.label} error: {error}" for error in level.errors]
    if system.error:
        lines.append(f"  - **not measured**: {system.error}")
    if system.log_tail:
        tail = "\n".join(system.log_tail.splitlines()[-LOG_TAIL_LINES:])
        lines.append("\n  ```\n" + "\n".join("  " + line for line in tail.splitlines()) + "\n  ```")
    return "\n".join(lines)


def render(report: Report) -> str:
    # A merged report keeps each run's settings under "sources", for the JSON only.
    shown = {k: v for k, v in report.settings.items() if v not in (None, "") and k != "sources"}
    settings = ", ".join(f"{k}={v}" for k, v in shown.items())
    machine = ", ".join(f"{k}={v}" for k, v in report.machine.items() if v is not None)
    parts = [
        "# Load test: " + ", ".join(s.name for s in report.systems),
        f"Settings: {settings}\n\nMachine: {machine}",
        "## Systems\n\n" + "\n".join(system_notes(s) for s in report.systems),
        "## Levels\n\nOutput tok/s is the level's successful output tokens over its wall time; "
        "accept and tok/round come from the server's /metrics, diffed around the level.\n\n"
        + level_tables(report.systems),
    ]
    batch1 = batch1_table(report.systems, report.speedups)
    if batch1 is not None:
        parts.append(
            "## Batch 1 by Spec-Bench task\n\nTokens per second per request (output tokens over "
            "request time, summed per task); ratios are speedups over the prompts both systems "
            "finished.\n\n" + batch1
        )
    for system in report.systems:
        if system.kind == "server" and system.levels:
            parts.append(f"## {system.name}: tok/s per request by task\n\n" + task_table(system))
    return "\n\n".join(parts) + "\n"
