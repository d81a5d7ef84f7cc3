"""``python -m loadtest soak``: a fixed concurrency for N minutes, watching the server for leaks.

Every few seconds it samples the server's resident memory (``process_resident_memory_bytes``
from /metrics, or /proc/PID/status with ``--pid``) and its slot and queue gauges. The verdict:
no failed request, the slots and the queue back at zero once the load stops, and how much the
RSS grew from the first sample (taken after warm-up) to the last (a failure past
``--max-rss-growth``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.client import RequestOptions, root_url, stream_request
from loadtest.probe import choose_stream_options, discover_model
from loadtest.prompts import Prompt

_GAUGES = {
    "specserve:kv_slots_used": "slots_used",
    "specserve:num_requests_running": "running",
    "specserve:num_requests_waiting": "waiting",
    "process_resident_memory_bytes": "rss_bytes",
}
_SETTLE_S = 10.0  # how long the gauges get to fall back to zero after the load stops


@dataclass
class Sample:
    t: float  # seconds since the load started
    ok: int
    failed: int
    rss_bytes: float | None = None
    slots_used: float | None = None
    running: float | None = None
    waiting: float | None = None


@dataclass
class SoakResult:
    settings: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the report
    settled: Sample | None = None  # the gauges once the load is over

    @property
    def rss_growth_pct(self) -> float | None:
        rss = [s.rss_bytes for s in self.samples if s.rss_bytes]
        return 100.0 * (rss[-1] - rss[0]) / rss[0] if len(rss) >= 2 else None

    @property
    def drained(self) -> bool:
        s = self.settled
        return s is not None and not (s.slots_used or s.running or s.waiting)

    @property
    def rss_ok(self) -> bool:
        limit, growth = self.settings.get("max_rss_growth_pct"), self.rss_growth_pct
        return limit is None or growth is None or growth <= limit

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.ok > 0 and self.drained and self.rss_ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "rss_growth_pct": self.rss_growth_pct,
            "drained": self.drained,
            "passed": self.passed,
        }


def parse_gauges(text: str) -> dict[str, float]:
    """The unlabelled samples of ``_GAUGES`` in a Prometheus text exposition."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _GAUGES:
            values[_GAUGES[name]] = float(value)
    return values


def proc_rss(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    return None


async def _sample(
    client: httpx.AsyncClient, result: SoakResult, t: float, pid: int | None
) -> Sample:
    sample = Sample(t=round(t, 2), ok=result.ok, failed=result.failed)
    try:
        response = await client.get("/metrics", timeout=10)
        for key, value in parse_gauges(response.text).items():
            setattr(sample, key, value)
    except httpx.HTTPError as exc:
        result.errors.append(f"/metrics: {exc}")
    if pid is not None:
        sample.rss_bytes = proc_rss(pid)
    return sample


async def run_soak(
    base_url: str,
    prompts: list[Prompt],
    options: RequestOptions,
    *,
    seconds: float,
    concurrency: int,
    sample_every: float = 5.0,
    pid: int | None = None,
    api_key: str | None = None,
    warmup: int = 2,
    max_rss_growth_pct: float | None = None,
) -> SoakResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    settings = {"base_url": base_url, "seconds": seconds, "concurrency": concurrency,
                "sample_every": sample_every, "pid": pid, "max_tokens": options.max_tokens,
                "endpoint": options.endpoint, "num_prompts": len(prompts),
                "max_rss_growth_pct": max_rss_growth_pct}  # fmt: skip
    result = SoakResult(settings)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(
        base_url=root_url(base_url), headers=headers, timeout=600, limits=limits
    ) as client:
        if options.model is None:
            options = dataclasses.replace(options, model=await discover_model(client))
        options, _ = await choose_stream_options(client, options, prompts[0])
        for prompt in prompts[:warmup]:
            await stream_request(client, options, prompt)
        cycle = itertools.cycle(prompts)
        start = time.monotonic()
        deadline = start + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                record = await stream_request(client, options, next(cycle))
                if record.ok:
                    result.ok += 1
                else:
                    result.failed += 1
                    if len(result.errors) < 20:
                        result.errors.append(record.error or "failed")

        async def sampler() -> None:
            while time.monotonic() < deadline:
                result.samples.append(await _sample(client, result, time.monotonic() - start, pid))
                await asyncio.sleep(sample_every)

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
        result.samples.append(await _sample(client, result, time.monotonic() - start, pid))
        settle_until = time.monotonic() + _SETTLE_S
        while True:
            result.settled = await _sample(client, result, time.monotonic() - start, pid)
            if result.drained or time.monotonic() > settle_until:
                break
            await asyncio.sleep(0.5)
    return result


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def render(result: SoakResult) -> str:
    s = result.settings
    growth = result.rss_growth_pct
    lines = [
        "# Soak",
        "",
        f"{s['seconds']:.0f} s at concurrency {s['concurrency']} against {s['base_url']} "
        f"({s['endpoint']}, max_tokens {s['max_tokens']})",
        "",
        f"- verdict: **{'PASS' if result.passed else 'FAIL'}**",
        f"- requests: {result.ok} ok, {result.failed} failed",
        f"- RSS growth first to last sample: {'-' if growth is None else f'{growth:+.1f} %'}"
        + ("" if s.get("max_rss_growth_pct") is None else f" (limit {s['max_rss_growth_pct']} %)"),
        f"- drained after the load (slots, running, waiting all 0): {result.drained}",
        "",
        "| t (s) | ok | failed | RSS (MiB) | slots used | running | waiting |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in [*result.samples, *([result.settled] if result.settled else [])]:
        lines.append(
            f"| {x.t:.0f} | {x.ok} | {x.failed} | {_mib(x.rss_bytes)} | {x.slots_used} | "
            f"{x.running} | {x.waiting} |"
        )
    if result.errors:
        lines += ["", "First errors:", "", *(f"- {e}" for e in result.errors[:10])]
    return "\n".join(lines) + "\n"


def write_soak(result: SoakResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "soak.json", out_dir / "soak.md"]
    paths[0].write_text(json.dumps(result.to_dict(), indent=1))
    paths[1].write_text(render(result))
    return paths
