"""Writes a report: JSON, Markdown (also printed), PNG plots."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtest.markdown import render
from loadtest.plots import write_plots
from loadtest.results import Report


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return ", ".join(out.stdout.split("\n")).strip(", ") or None


def machine_info() -> dict[str, Any]:
    """Enough to tell whether two reports are comparable, without importing torch."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "gpu": _gpu(),
    }


def write_report(report: Report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render(report)
    report.save(out_dir / "report.json")
    (out_dir / "report.md").write_text(markdown)
    plots = write_plots(report, out_dir)
    print(markdown)
    written = [out_dir / "report.json", out_dir / "report.md", *plots]
    print("[loadtest] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return written
