"""Adaptive gamma's start-up timings: measured, and kept on disk between runs.

``calibrate`` times verify forwards, draft steps and draft catch-ups in the trash slot.
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
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine import cpu_linear
from engine.config import EngineConfig
from engine.gamma import (
    LINEAR_FROM,
    LINEAR_TOLERANCE,
    CostModel,
    calibration_sizes,
    measure,
    measure_until_linear,
)
from engine.proposer import DraftProposer
from engine.runner import ModelRunner, RaggedBatch

log = logging.getLogger("specserve.calibration")

# Bumped whenever what the calibration measures, or how, changes: older files then miss.
FORMAT = 4  # 4: with CUDA graphs, verifies are timed in rows of gamma + 1 (was one row)
# Calibration files a directory keeps (the most recently written).
KEEP_FILES = 32
# Sizes of the draft catch-up timed at start-up: a few tokens behind, a short prompt, a window.
CATCH_UP_CALIBRATION = (16, 64, 256)
ATTENTION_CALIBRATION = 1024  # context of the verify timed against an empty one at start-up
# A cached forward time holds while a fresh one lies within this factor of it either way.
TOLERANCE = 1.25
# Verify sizes the spot check times: one token (a decode) and a typical verify.
SPOT_VERIFY = (1, 8)
# Engine settings that change no forward the calibration times (admission, prompt chunking,
# where drafts come from, what the draft's window holds): changing them keeps the timings.
UNTIMED_SETTINGS = (
    "calibration_cache", "prefix_cache", "prefill_budget", "prefill_chunk",
    "prefill_chunk_seconds", "prompt_lookup", "draft_window", "draft_head",
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
        # Every other model, setting or machine leaves a file: the oldest go past a few dozen.
        kept = sorted(directory.glob("*.json"), key=lambda path: path.stat().st_mtime)
        for stale in kept[:-KEEP_FILES]:
            stale.unlink(missing_ok=True)
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


def _verify_limit(target: ModelRunner, max_slots: int, gamma: int) -> int:
    """The largest verify a round can run: every slot's gamma drafts and its last token."""
    return min(target.capacity, max_slots * (gamma + 1))


def _verify_probe(target: ModelRunner) -> Callable[[int], None]:
    """A verify forward of so many tokens in the trash slot (for timing only). With CUDA
    graphs, in rows as wide as a round's (gamma + 1): a round's tokens come that way, and one
    longer row would be an eager forward, timed at what launching its kernels costs."""
    trash = target.cache.trash_slot
    width = target.graphs.max_width if target.graphs is not None else None

    def verify(tokens: int) -> None:
        lengths = [tokens]
        if width is not None and tokens > width:
            lengths = [width] * (tokens // width) + ([tokens % width] if tokens % width else [])
        rows = len(lengths)
        batch = RaggedBatch([[0] * n for n in lengths], [trash] * rows, [0] * rows, lengths)
        target.forward(batch, "all")

    return verify


def _draft_probe(proposer: DraftProposer) -> Callable[[int], None]:
    """A draft step of so many rows in the trash slot, through the proposer's own head (a
    restricted one with --draft-vocab), for timing only."""
    trash = proposer.runner.cache.trash_slot

    def step(rows: int) -> None:
        batch = RaggedBatch([[0]] * rows, [trash] * rows, list(range(rows)), [1] * rows)
        proposer.logits(batch)

    return step


def calibrate(
    target: ModelRunner, proposer: DraftProposer | None, max_slots: int, gamma: int
) -> CostModel:
    """Times verify forwards of 1..slots*(gamma+1) tokens and draft steps of 1..slots rows,
    in the trash slot, so adaptive gamma knows what each choice costs on this machine."""
    trash = target.cache.trash_slot
    capacity = target.capacity
    started = time.perf_counter()
    limit = _verify_limit(target, max_slots, gamma)
    sync = target.synchronize
    table = measure_until_linear(_verify_probe(target), calibration_sizes(limit), synchronize=sync)
    costs = CostModel(target=table, learn=True)
    # Attention over a context: the same verify of a few tokens at an empty and at a long
    # context (the trash slot's stale K/V serve as context; only the time matters).
    queries = min(4, limit)
    context = min(ATTENTION_CALIBRATION, capacity - queries)
    if context > 0:

        def verify_at(start: int) -> None:
            target.forward(RaggedBatch([[0] * queries], [trash], [start], [queries]), "all")

        times = measure(verify_at, [0, context], synchronize=sync)
        costs.attention = max(0.0, (times[context] - times[0]) / (queries * context))
    if proposer is not None:
        draft = proposer.runner
        sizes = calibration_sizes(min(capacity, max_slots))
        costs.draft = measure(_draft_probe(proposer), sizes, synchronize=draft.synchronize)

        def catch_up(tokens: int) -> None:
            draft.prefill(RaggedBatch([[0] * tokens], [trash], [0], [tokens]))

        sizes = [t for t in CATCH_UP_CALIBRATION if t <= capacity] or [capacity]
        costs.draft_catch_up = measure(catch_up, sizes, synchronize=draft.synchronize)
    log.info("adaptive gamma calibrated in %.1f s", time.perf_counter() - started)
    return costs


def facts(
    target: ModelRunner, proposer: DraftProposer | None, config: EngineConfig, gamma: int
) -> dict[str, Any]:
    """Everything a timed forward's cost depends on, naming the calibration that holds for it."""
    settings = asdict(config)
    for name in UNTIMED_SETTINGS:
        settings.pop(name)
    runners = {"target": target}
    if proposer is not None:
        runners["draft"] = proposer.runner
    limit = _verify_limit(target, config.max_slots, gamma)
    return {
        "format": FORMAT,
        # What calibrate times, so a change to it misses without a FORMAT bump.
        "sizes": [
            calibration_sizes(limit),
            CATCH_UP_CALIBRATION,
            ATTENTION_CALIBRATION,
            LINEAR_FROM,
            LINEAR_TOLERANCE,
        ],  # fmt: skip
        "engine": settings,
        "gamma": gamma,
        "capacity": target.capacity,
        "models": {
            name: {
                "config": runner.model.config.to_dict(),
                "dtype": str(runner.dtype),
                "attention": runner.model.config._attn_implementation,
                "fused": runner.fused is not None,
            }
            for name, runner in runners.items()
        },
        "device": target.device.type,
        "device_name": device_name(target.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # The build too: a kernel changed in place times differently under the same ISA.
        "cpu_kernels": [cpu_linear.isa(), cpu_linear.build()] if config.cpu_kernels else None,
        "prompt_gemm_rows": cpu_linear.PROMPT_GEMM_MIN_ROWS,
    }


def start_up_costs(
    target: ModelRunner, proposer: DraftProposer | None, config: EngineConfig, gamma: int
) -> CostModel:
    """Adaptive gamma's timings: from ``config.calibration_cache`` when a spot check agrees
    with them, else measured (and then kept there)."""
    if config.calibration_cache is None:
        return calibrate(target, proposer, config.max_slots, gamma)
    directory = Path(config.calibration_cache)
    named = facts(target, proposer, config, gamma)
    key = digest(named)
    cached = load(directory, key)
    if cached is not None:
        started = time.perf_counter()
        sizes = [s for s in SPOT_VERIFY if s in cached.target] or [min(cached.target)]
        fresh = measure(_verify_probe(target), sizes, synchronize=target.synchronize)
        holds = still_holds(cached.target, fresh)
        if holds and proposer is not None and cached.draft:
            sync = proposer.runner.synchronize
            fresh = measure(_draft_probe(proposer), [min(cached.draft)], synchronize=sync)
            holds = still_holds(cached.draft, fresh)
        seconds = time.perf_counter() - started
        if holds:
            log.info("adaptive gamma: timings from %s (checked in %.1f s)", directory, seconds)
            return cached
        log.info("adaptive gamma: the kept timings no longer hold on this machine")
    costs = calibrate(target, proposer, config.max_slots, gamma)
    save(directory, key, costs, named)
    return costs
