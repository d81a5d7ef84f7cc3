"""Closed-loop concurrency, Poisson arrivals, and the count and time bounds."""

from __future__ import annotations

import asyncio
import time

from loadtest.generator import Level, default_request_count, run_level
from loadtest.prompts import Prompt
from loadtest.records import RequestRecord

PROMPTS = [Prompt("qa", "a"), Prompt("rag", "b"), Prompt("qa", "c")]


class FakeServer:
    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.in_flight = 0
        self.peak = 0
        self.sent: list[str] = []

    async def send(self, prompt: Prompt) -> RequestRecord:
        start = time.perf_counter()
        self.sent.append(prompt.text)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.latency)
        self.in_flight -= 1
        return RequestRecord(prompt.task, True, start, time.perf_counter(), output_tokens=4)


def test_closed_loop_keeps_concurrency_and_cycles_prompts() -> None:
    server = FakeServer(0.02)
    records, wall = asyncio.run(run_level(server.send, PROMPTS, Level(concurrency=2), 7))
    assert len(records) == 7 and server.peak == 2
    assert server.sent == ["a", "b", "c", "a", "b", "c", "a"]
    assert 0.07 <= wall < 1.0  # four waves of 20 ms


def test_time_bound_stops_new_requests() -> None:
    server = FakeServer(0.05)
    records, wall = asyncio.run(
        run_level(server.send, PROMPTS, Level(concurrency=1), 1000, duration_s=0.12)
    )
    assert 2 <= len(records) <= 4 and wall < 0.5


def test_open_loop_sends_every_request_at_poisson_arrivals() -> None:
    server = FakeServer(0.05)
    level = Level(rate=200.0, max_concurrency=3)
    records, wall = asyncio.run(run_level(server.send, PROMPTS, level, 12, seed=1))
    assert len(records) == 12 and server.peak <= 3 and wall < 2.0


def test_levels_and_default_counts() -> None:
    assert Level(concurrency=4).label == "c=4" and Level(rate=2.5).label == "rate=2.5/s"
    assert default_request_count(48, Level(concurrency=32)) == 64
    assert default_request_count(12, Level(concurrency=2)) == 12
    for bad in ({}, {"concurrency": 1, "rate": 1.0}):
        try:
            Level(**bad)
        except ValueError:
            continue
        raise AssertionError(f"Level({bad}) accepted")
