"""Measures one OpenAI-compatible server over a list of levels."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from dataclasses import dataclass, field

import httpx

from loadtest import acceptance
from loadtest.client import RequestOptions, root_url, stream_request
from loadtest.generator import Level, default_request_count, run_level
from loadtest.probe import choose_stream_options, discover_model
from loadtest.prompts import Prompt
from loadtest.records import RequestRecord
from loadtest.results import SystemResult
from loadtest.stats import LevelStats, summarise


@dataclass
class LoadSettings:
    levels: list[Level]
    options: RequestOptions = field(default_factory=RequestOptions)
    num_requests: int | None = None  # per level; None: default_request_count
    duration_s: float | None = None  # per level
    warmup: int = 0
    request_timeout_s: float = 600.0
    seed: int = 0
    api_key: str | None = None


def _client(base_url: str, settings: LoadSettings) -> httpx.AsyncClient:
    biggest = max((lv.concurrency or lv.max_concurrency or 0) for lv in settings.levels)
    # Open-loop levels may hold any number of requests in flight: leave the pool unbounded.
    limit = biggest + 4 if biggest else None
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.AsyncClient(
        base_url=root_url(base_url),
        headers=headers,
        timeout=httpx.Timeout(settings.request_timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
    )


def _log(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)


async def _warm_up(
    client: httpx.AsyncClient, options: RequestOptions, prompts: list[Prompt], n: int
) -> None:
    # All at once, so batched code paths are warm too, not only batch 1.
    jobs = [stream_request(client, options, prompts[i % len(prompts)]) for i in range(n)]
    records: list[RequestRecord] = list(await asyncio.gather(*jobs))
    failures = sum(not r.ok for r in records)
    if failures:
        _log(f"warm-up: {failures}/{n} requests failed ({records[0].error})")


async def measure_level(
    client: httpx.AsyncClient,
    options: RequestOptions,
    prompts: list[Prompt],
    level: Level,
    settings: LoadSettings,
) -> LevelStats:
    before = await acceptance.scrape(client)
    count = settings.num_requests or default_request_count(len(prompts), level)

    async def send(prompt: Prompt) -> RequestRecord:
        record = await stream_request(client, options, prompt)
        record.prompt = prompt.key
        return record

    records, wall = await run_level(send, prompts, level, count, settings.duration_s, settings.seed)
    after = await acceptance.scrape(client)
    return summarise(
        records, wall, level.label, level.concurrency, level.rate, acceptance.diff(before, after)
    )


async def measure_server(
    name: str, base_url: str, prompts: list[Prompt], settings: LoadSettings
) -> SystemResult:
    result = SystemResult(name=name, kind="server")
    async with _client(base_url, settings) as client:
        options = settings.options
        if options.model is None:
            options = dataclasses.replace(options, model=await discover_model(client))
        result.model = options.model
        options, notes = await choose_stream_options(client, options, prompts[0])
        result.notes.extend(notes)
        if settings.warmup:
            await _warm_up(client, options, prompts, settings.warmup)
        for level in settings.levels:
            stats = await measure_level(client, options, prompts, level, settings)
            result.levels.append(stats)
            _log(
                f"{name} {stats.label}: {stats.ok} ok, {stats.failed} failed, "
                f"{stats.tokens_per_s:.1f} tok/s in {stats.wall_s:.1f}s"
            )
    return result
