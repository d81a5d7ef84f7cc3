"""Adaptive gamma's start-up timings, kept on disk between runs.

Timing verify and draft forwards was over half of a server start on a 2-core CPU (12 of 26 s)
and gives the same table each time on the same machine, models and settings. A start finds the
table by a digest of everything that changes a forward's cost (model shapes and dtypes, device,
threads, kernels, engine settings), times two verify sizes and one draft step against it, and
keeps it when they still agree: a machine that got slower or faster (another tenant, another
power state) is timed afresh, and the new table replaces the old.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.gamma import CostModel

log = logging.getLogger("specserve.calibration")

# Bumped whenever what the calibration measures, or how, changes: older files then miss.
FORMAT = 1
# A cached forward time holds while a fresh one lies within this factor of it either way.
TOLERANCE = 1.25
# Verify sizes the spot check times: one token (a decode) and a typical verify.
SPOT_VERIFY = (1, 8)
# Engine settings that change no forward the calibration times (admission, prompt chunking,
# where drafts come from, what the draft's window holds): changing them keeps the timings.
UNTIMED_SETTINGS = (
    "calibration_cache", "prefix_cache", "prefill_budget", "prefill_chunk", "prompt_lookup",
    "draft_window", "draft_head",
)  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def digest(facts: dict[str, Any]) -> str:
    """A short stable name for ``facts`` (any JSON-able values; others by their str)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _table(raw: dict[str, float]) -> dict[int, float]:
    return {int(size): float(seconds) for size, seconds in raw.items()}


def to_json(costs: CostModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "target": costs.target,
        "draft": costs.draft,
        "draft_catch_up": costs.draft_catch_up,
        "attention": costs.attention,
    }


def from_json(data: dict[str, Any]) -> CostModel | None:
    """The start-up figures a file holds (learning on, as a fresh calibration), or None when
    the file is of another format or incomplete."""
    try:
        if data.get("format") != FORMAT or not data["target"]:
            return None
        return CostModel(
            target=_table(data["target"]),
            draft=_table(data["draft"]),
            draft_catch_up=_table(data["draft_catch_up"]),
            attention=float(data["attention"]),
            learn=True,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def load(directory: Path, key: str) -> CostModel | None:
    path = directory / f"{key}.json"
    try:
        return from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def save(directory: Path, key: str, costs: CostModel, facts: dict[str, Any]) -> None:
    """Writes the figures (with the facts they hold for, for a reader) atomically; a cache
    that cannot be written only costs the next start its calibration."""
    data = to_json(costs) | {"facts": facts}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
            json.dump(data, handle, indent=1, default=str)
        os.replace(handle.name, directory / f"{key}.json")
    except OSError as exc:
        log.warning("could not keep the calibration in %s: %s", directory, exc)


def still_holds(cached: dict[int, float], fresh: dict[int, float]) -> bool:
    """Whether every freshly timed size costs what the cached table says, within TOLERANCE."""
    for size, seconds in fresh.items():
        expected = cached.get(size)
        if expected is None or expected <= 0.0 or seconds <= 0.0:
            return False
        if not 1.0 / TOLERANCE <= seconds / expected <= TOLERANCE:
            return False
    return True
