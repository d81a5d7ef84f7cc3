"""PNG plots: throughput and latency against load, tok/s and speedup per Spec-Bench task."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on benchmark machines

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from loadtest.markdown import batch1_prompts, batch1_rates, speedup  # noqa: E402
from loadtest.results import Report, SystemResult  # noqa: E402
from loadtest.stats import LevelStats  # noqa: E402


def _x(level: LevelStats) -> float | None:
    return float(level.concurrency) if level.concurrency is not None else level.rate


def _axis_label(systems: list[SystemResult]) -> str:
    rated = any(lv.rate is not None for s in systems for lv in s.levels)
    return "request rate (req/s)" if rated else "concurrency"


def _series(system: SystemResult, attr: str) -> tuple[list[float], list[float]]:
    points = [(_x(lv), getattr(lv, attr)) for lv in system.levels]
    kept = [(x, y) for x, y in points if x is not None and y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def _style_load_axis(ax: Axes, systems: list[SystemResult]) -> None:
    ax.set_xlabel(_axis_label(systems))
    if _axis_label(systems) == "concurrency":
        # Doubling levels sit evenly on a log axis; label them as the plain numbers they are.
        ax.set_xscale("log", base=2)
        levels = sorted({x for s in systems for lv in s.levels if (x := _x(lv)) is not None})
        ax.set_xticks(levels, [f"{x:g}" for x in levels])
        ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def plot_throughput(systems: list[SystemResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in systems:
        xs, ys = _series(system, "tokens_per_s")
        if xs:
            ax.plot(xs, ys, marker="o", label=system.name)
    _style_load_axis(ax, systems)
    ax.set_ylabel("output tokens/s (aggregate)")
    ax.set_title("Throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(systems: list[SystemResult], path: Path) -> Path:
    panels = [("ttft", "TTFT (s)"), ("itl", "inter-token latency (s)"), ("e2e", "end-to-end (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for index, system in enumerate(systems):
            color = colors[index % len(colors)]
            for quantile, style in (("p50", "-"), ("p95", "--")):
                xs, ys = _series(system, f"{metric}_{quantile}")
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=color)
        _style_load_axis(ax, systems)
        ax.set_title(title)
    # One colour per system and one line style per quantile, outside the panels.
    handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", label=s.name)
               for i, s in enumerate(systems)]  # fmt: skip
    handles += [Line2D([], [], color="black", linestyle=style, label=q)
                for q, style in (("p50", "-"), ("p95", "--"))]  # fmt: skip
    fig.legend(handles=handles, loc="center right", fontsize="small")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _grouped_bars(
    groups: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    title: str,
    path: Path,
    reference: float | None = None,
) -> Path:
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(groups)), 4.5))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        offsets = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(offsets, values, width, label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tasks(systems: list[SystemResult], path: Path) -> Path | None:
    """Per-task tok/s at batch 1 (concurrency 1), one bar per system."""
    rates = batch1_rates(systems)
    if not rates:
        return None
    groups = sorted({t for per_task in rates.values() for t in per_task} - {"overall"})
    groups.append("overall")
    series = {
        name: [(per_task[t].tokens_per_s or 0.0) if t in per_task else 0.0 for t in groups]
        for name, per_task in rates.items()
    }
    return _grouped_bars(groups, series, "tokens/s per request", "Batch 1 by task", path)


def plot_speedups(
    systems: list[SystemResult], pairs: list[tuple[str, str]], path: Path
) -> Path | None:
    rates = batch1_rates(systems)
    pairs = [p for p in pairs if p[0] in rates and p[1] in rates]
    if not pairs:
        return None
    groups = sorted({t for per_task in rates.values() for t in per_task} - {"overall"})
    groups.append("overall")
    prompts = batch1_prompts(systems)
    series = {
        f"{a} / {b}": [speedup(rates, (a, b), t, prompts) or 0.0 for t in groups] for a, b in pairs
    }
    title = "Batch-1 speedup per Spec-Bench task"
    return _grouped_bars(groups, series, "speedup (x)", title, path, reference=1.0)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    systems = [s for s in report.systems if s.levels]
    if not systems:
        return []
    written = [
        plot_throughput(systems, out_dir / "throughput.png"),
        plot_latency(systems, out_dir / "latency.png"),
        plot_tasks(systems, out_dir / "tasks.png"),
        plot_speedups(systems, report.speedups, out_dir / "speedup_per_task.png"),
    ]
    return [p for p in written if p is not None]
