"""Issues requests at a fixed concurrency or at Poisson arrivals, bounded in count and time."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import cycle, islice

from loadtest.prompts import Prompt
from loadtest.records import RequestRecord

Send = Callable[[Prompt], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Level:
    """Exactly one of ``concurrency`` (closed loop) or ``rate`` (open loop, requests/s)."""

    concurrency: int | None = None
    rate: float | None = None
    max_concurrency: int | None = None  # caps in-flight requests in rate mode

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a level has either a concurrency or a rate")

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"


def default_request_count(prompts: int, level: Level) -> int:
    """Every prompt once, and at least two waves so a level reaches its steady state."""
    return max(prompts, 2 * (level.concurrency or level.max_concurrency or 1))


async def run_level(
    send: Send,
    prompts: list[Prompt],
    level: Level,
    num_requests: int,
    duration_s: float | None = None,
    seed: int = 0,
) -> tuple[list[RequestRecord], float]:
    """Records and wall time. No request starts after ``duration_s``; those in flight finish
    (each bounded by the client's own timeout), so a level may overrun by one request."""
    started = time.perf_counter()
    deadline = started + duration_s if duration_s is not None else float("inf")
    todo = islice(cycle(prompts), num_requests)
    if level.concurrency is not None:
        records = await _closed_loop(send, todo, level.concurrency, deadline)
    else:
        assert level.rate is not None
        records = await _open_loop(send, todo, level, deadline, random.Random(seed))
    ended = max((r.end for r in records), default=time.perf_counter())
    return records, ended - started


async def _closed_loop(
    send: Send, todo: islice[Prompt], concurrency: int, deadline: float
) -> list[RequestRecord]:
    records: list[RequestRecord] = []

    async def worker() -> None:
        # The iterator is shared: next() never yields to the loop, so no prompt is sent twice.
        for prompt in todo:
            if time.perf_counter() >= deadline:
                return
            records.append(await send(prompt))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _open_loop(
    send: Send, todo: islice[Prompt], level: Level, deadline: float, rng: random.Random
) -> list[RequestRecord]:
    assert level.rate is not None
    gate = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None

    async def gated(prompt: Prompt) -> RequestRecord:
        if gate is None:
            return await send(prompt)
        async with gate:
            return await send(prompt)

    tasks: list[asyncio.Task[RequestRecord]] = []
    arrival = time.perf_counter()
    for prompt in todo:
        if arrival >= deadline:
            break
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(gated(prompt)))
        arrival += rng.expovariate(level.rate)
    return list(await asyncio.gather(*tasks))
