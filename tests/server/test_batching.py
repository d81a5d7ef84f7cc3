"""The async loop: continuous batching, a free event loop, disconnects, admission, faults."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from engine.engine import Engine
from tests.server.conftest import (
    MODEL,
    RunningServer,
    hold_steps,
    make_engine,
    reference_run,
    serve,
)

REQUESTS = [  # (prompt, max_tokens, temperature, seed): greedy and seeded sampling mixed
    ([5, 6, 7, 8, 9, 10, 11], 30, 0.0, None),
    ([20, 21], 24, 1.0, 3),
    (list(range(40, 63)), 28, 0.0, None),
    ([7], 20, 0.8, 11),
]


def _body(prompt: list[int], max_tokens: int, temperature: float, seed: int | None) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": temperature, "seed": seed}  # fmt: skip


def _stream_text(url: str, body: dict) -> str:
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=60
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(httpx.Response(200, content=e).json()["choices"][0]["text"] for e in events)


def _batched_rounds(running: RunningServer) -> float:
    metrics = running.metrics()
    total = metrics[("specserve:batch_size_per_round_count", ())]
    alone = metrics[("specserve:batch_size_per_round_bucket", (("le", "1.0"),))]
    return total - alone


def test_concurrent_streams_equal_isolated_outputs(
    server: RunningServer, reference: Engine
) -> None:
    isolated = [
        reference_run(reference, p, max_tokens=m, temperature=t, seed=s, ignore_eos=True).text
        for p, m, t, s in REQUESTS
    ]
    batched_before = _batched_rounds(server)
    barrier = threading.Barrier(len(REQUESTS))

    def run(request: tuple) -> str:
        barrier.wait()
        return _stream_text(server.url, _body(*request))

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(run, REQUESTS))
    assert together == isolated
    assert _batched_rounds(server) > batched_before  # they really shared rounds


def test_new_request_joins_without_waiting(reference: Engine) -> None:
    with serve(make_engine(step_delay=0.01)) as running:
        long_body = _body([5, 6, 7], 200, 0.0, None) | {"stream": True}
        done: dict[str, float] = {}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=long_body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            short = httpx.post(
                f"{running.url}/v1/completions", json=_body([20, 21], 5, 0.0, None), timeout=30
            ).json()
            done["short"] = time.monotonic()
            for _ in lines:
                pass
            done["long"] = time.monotonic()
        assert done["short"] < done["long"]
        expected = reference_run(reference, [20, 21], max_tokens=5, temperature=0, ignore_eos=True)
        assert short["choices"][0]["text"] == expected.text


def test_health_and_metrics_answer_while_a_step_runs() -> None:
    # A loop blocked by the step would make a probe wait for the step to end: nearly the whole
    # step_delay for every probe after the first. Half of it leaves room for a loaded CI box.
    step_delay = 0.6
    with serve(make_engine(step_delay=step_delay)) as running, running.http() as http:
        assert http.get("/health").status_code == 200  # connect before the engine is busy
        body = _body([5, 6, 7], 12, 0.0, None)
        worker = threading.Thread(target=httpx.post, args=(f"{running.url}/v1/completions",),
                                  kwargs={"json": body, "timeout": 60})  # fmt: skip
        worker.start()
        running.wait_for(lambda: running.engine.num_running == 1)
        latencies = []
        for path in ("/health", "/metrics", "/ready") * 3:
            started = time.perf_counter()
            assert http.get(path).status_code == 200
            latencies.append(time.perf_counter() - started)
        assert running.engine.num_running == 1  # the engine was busy all along
        assert max(latencies) < step_delay / 2
        worker.join()


def _slots_free(running: RunningServer) -> bool:
    engine = running.engine
    return engine.scheduler.num_free_slots == engine.config.max_slots


def _aborted(running: RunningServer) -> float:
    return running.metrics()[("specserve:request_success_total", (("finished_reason", "abort"),))]


def test_disconnect_aborts_and_frees_the_slot() -> None:
    with serve(make_engine(max_slots=1, step_delay=0.05)) as running:
        body = _body([5, 6, 7], 200, 0.0, None) | {"stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: {"))
            assert not _slots_free(running)
            rounds_at_close = running.engine.stats.rounds
        running.wait_for(lambda: _slots_free(running), timeout=5)
        # Freed by the round after the one in flight, not when 200 tokens are done.
        assert running.engine.stats.rounds - rounds_at_close <= 2
        assert _aborted(running) == 1
        # The same happens to a non-streaming client that gives up.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.url}/v1/completions", json=_body([5, 6], 200, 0.0, None),
                       timeout=0.5)  # fmt: skip
        running.wait_for(lambda: _slots_free(running) and _aborted(running) == 2, timeout=5)
        ok = running.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_queue_bound_answers_429_with_retry_after() -> None:
    engine = make_engine(max_slots=1, step_delay=0.05)
    steps_run = hold_steps(engine)
    with serve(engine, max_queue=1) as running:
        body = _body([5, 6, 7], 200, 0.0, None) | {"stream": True}
        url = f"{running.url}/v1/completions"
        with httpx.stream("POST", url, json=body), httpx.stream("POST", url, json=body):
            running.wait_for(lambda: running.context.core.num_in_flight == 2)
            # Rounds pause here, so neither request can finish while the checks run.
            steps_run.clear()
            try:
                response = httpx.post(url, json=_body([1, 2], 2, 0.0, None))
                assert response.status_code == 429
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["code"] == "queue_full"
                with pytest.raises(openai.RateLimitError):
                    running.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
                assert running.engine.num_waiting + running.engine.num_running == 2
            finally:
                steps_run.set()
        running.wait_for(lambda: running.context.core.num_in_flight == 0, timeout=5)
        rejected = running.metrics()[
            ("specserve:request_rejected_total", (("reason", "queue_full"),))
        ]
        assert rejected == 2
        assert httpx.post(url, json=_body([1, 2], 2, 0.0, None)).status_code == 200
        # More sequences than slots plus queue can never fit: that is the client's error.
        too_many = httpx.post(url, json=_body([1, 2], 2, 1.0, None) | {"n": 3})
        assert too_many.status_code == 400 and "at most 2" in too_many.json()["error"]["message"]


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on() -> None:
    engine = make_engine()
    real_forward = engine.target.forward
    fail = threading.Event()

    def flaky_forward(*args, **kwargs):  # noqa: ANN002, ANN003
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected fault")
        return real_forward(*args, **kwargs)

    engine.target.forward = flaky_forward  # type: ignore[method-assign]
    with serve(engine) as running:
        client = running.client()
        fail.set()
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            client.completions.create(model=MODEL, prompt="hello", max_tokens=8)
        fail.set()
        stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, stream=True)
        with pytest.raises(openai.APIError, match="injected fault"):
            list(stream)
        running.wait_for(lambda: _slots_free(running))
        assert httpx.get(f"{running.url}/health").status_code == 200
        result = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0)
        assert result.usage.completion_tokens >= 1
        errors = running.metrics()[
            ("specserve:request_success_total", (("finished_reason", "error"),))
        ]
        assert errors == 2


def test_a_dead_engine_thread_shows_in_health() -> None:
    engine = make_engine()
    with serve(engine) as running:

        def broken() -> bool:
            raise RuntimeError("loop bug")

        engine.has_work = broken  # type: ignore[method-assign]
        response = httpx.post(
            f"{running.url}/v1/completions", json=_body([1, 2], 4, 0.0, None), timeout=30
        )
        assert response.status_code == 500 and "loop bug" in response.json()["error"]["message"]
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and "loop bug" in health.json()["error"]
        assert httpx.get(f"{running.url}/ready").status_code == 503
        refused = httpx.post(f"{running.url}/v1/completions", json=_body([1, 2], 4, 0.0, None))
        assert refused.status_code == 503


def test_ready_only_after_warm_up() -> None:
    with serve(make_engine(step_delay=0.2), wait_ready=False) as running, running.http() as http:
        assert http.get("/health").status_code == 200
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "warming up"
        early = http.post("/v1/completions", json=_body([1, 2], 2, 0.0, None))
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        running.wait_for(lambda: http.get("/ready").status_code == 200, timeout=30)
        assert http.post("/v1/completions", json=_body([1, 2], 2, 0.0, None)).status_code == 200
