"""Engine faults: a round that raises fails only the request that breaks it; a dead engine thread
turns /health and new requests into prompt 503s."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.engine import Engine
from engine.request import Request
from tests.robustness.conftest import drained
from tests.server.conftest import MODEL, RunningServer, make_engine, reference_run, serve

POISON = 299  # a prompt starting with this token breaks every round it takes part in
INNOCENT = ([5, 6, 7, 8], 40)


def _poisoned_engine() -> Engine:
    engine = make_engine(max_slots=4, step_delay=0.01)
    real_round = engine._round

    def round_(batch: list[Request]) -> list:
        if any(r.prompt_token_ids[0] == POISON for r in batch):
            raise RuntimeError("poisoned round")
        return real_round(batch)

    engine._round = round_  # type: ignore[method-assign]
    return engine


def _body(prompt: list[int], max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip


def _stream(running: RunningServer, body: dict, started: threading.Event | None = None) -> list:
    events = []
    with running.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(httpx.Response(200, content=line[6:]).json())
                if started is not None:
                    started.set()
    return events


def _errors(running: RunningServer) -> float:
    return running.metrics()[("specserve:request_success_total", (("finished_reason", "error"),))]


def test_a_poisoned_request_fails_alone(reference: Engine) -> None:
    expected = reference_run(
        reference, INNOCENT[0], max_tokens=INNOCENT[1], temperature=0, ignore_eos=True
    ).text
    with serve(_poisoned_engine()) as running, ThreadPoolExecutor(4) as pool:
        started = threading.Event()
        innocent_stream = pool.submit(_stream, running, _body(*INNOCENT, stream=True), started)
        assert started.wait(10)  # it has sent tokens: its replay must not send them twice
        innocent_plain = pool.submit(
            lambda: running.http().post("/v1/completions", json=_body(*INNOCENT))
        )
        poisoned = running.http().post("/v1/completions", json=_body([POISON, 7, 8], 20))
        poisoned_events = _stream(running, _body([POISON, 9], 20, stream=True))

        assert poisoned.status_code == 500
        assert "poisoned round" in poisoned.json()["error"]["message"]
        assert "poisoned round" in poisoned_events[-1]["error"]["message"]
        events = innocent_stream.result(timeout=30)
        assert "".join(e["choices"][0]["text"] for e in events) == expected
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        plain = innocent_plain.result(timeout=30)
        assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == expected
        assert _errors(running) == 2
        # The innocent stream really shared the poisoned round and was replayed.
        assert running.metrics()[("specserve:request_replayed_total", ())] >= 1
        # The loop goes on: later requests are batched again and succeed.
        later = running.http().post("/v1/completions", json=_body(*INNOCENT))
        assert later.json()["choices"][0]["text"] == expected
        running.wait_for(lambda: drained(running), timeout=10)
        assert running.http().get("/health").status_code == 200


def test_a_dead_engine_thread_answers_503_at_once() -> None:
    engine = make_engine()
    with serve(engine) as running, running.http() as http:
        busy = threading.Thread(
            target=_stream, args=(running, _body([5, 6], 200, stream=True)), daemon=True
        )

        def broken() -> bool:
            raise RuntimeError("loop bug")

        engine.has_work = broken  # type: ignore[method-assign]
        busy.start()
        running.wait_for(lambda: not running.context.core.alive, timeout=10)
        busy.join(timeout=10)
        assert not busy.is_alive()  # the stream in flight was ended, not left hanging
        health = http.get("/health")
        assert health.status_code == 503 and "loop bug" in health.json()["error"]
        for body in (_body([1, 2], 4), _body([1, 2], 4, stream=True)):
            started = time.perf_counter()
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 503
            assert refused.headers["retry-after"]
            assert "loop bug" in refused.json()["error"]["message"]
            assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_round_alone_fails_its_request(stream: bool) -> None:
    with serve(_poisoned_engine()) as running:
        body = _body([POISON, 3], 8, stream=stream)
        if stream:
            assert "poisoned round" in _stream(running, body)[-1]["error"]["message"]
        else:
            assert running.http().post("/v1/completions", json=body).status_code == 500
        running.wait_for(lambda: drained(running), timeout=10)
        assert _errors(running) == 1
        assert running.metrics()[("specserve:request_replayed_total", ())] == 0
