"""Clients that vanish mid-stream: their slots come back, and nobody else notices."""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.engine import Engine
from tests.robustness.conftest import drained, errors_logged, hear_uvicorn
from tests.server.conftest import MODEL, make_engine, reference_run, serve

STREAMS = 100
CONCURRENCY = 8
FINISHER_EVERY = 5  # every fifth client reads its stream to the end
PROMPT = [5, 6, 7, 8, 9]


def _events(response: httpx.Response, limit: int | None) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            events.append(httpx.Response(200, content=line[6:]).json())
            if limit is not None and len(events) >= limit:
                break
    return events


def test_hundred_cut_streams_leave_nothing_behind(
    reference: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    expected = reference_run(reference, PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    rng = random.Random(0)
    cuts = [None if i % FINISHER_EVERY == 0 else rng.randint(0, 6) for i in range(STREAMS)]
    engine = make_engine(max_slots=4, step_delay=0.002)
    with serve(engine, max_queue=CONCURRENCY) as running, hear_uvicorn(caplog):

        def one(cut: int | None) -> str | None:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            with running.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = _events(r, cut)
            if cut is not None:
                return None  # closed early: the with-blocks dropped the connection
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            return "".join(e["choices"][0]["text"] for e in events)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            finished = [text for text in pool.map(one, cuts) if text is not None]
        running.wait_for(lambda: drained(running), timeout=10)
        assert running.engine.scheduler.num_free_slots == running.engine.config.max_slots
        aborted = running.metrics()[
            ("specserve:request_success_total", (("finished_reason", "abort"),))
        ]
    assert finished == [expected.text] * (STREAMS // FINISHER_EVERY)
    assert aborted > 0  # some cuts really landed while the request was running
    assert not errors_logged(caplog)
