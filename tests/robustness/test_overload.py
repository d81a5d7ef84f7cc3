"""Four times the capacity for a few seconds: the server sheds load, and what it admits is right."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from engine.engine import Engine
from tests.robustness.conftest import drained, queue_gauges
from tests.server.conftest import MODEL, make_engine, reference_run, serve

SLOTS, QUEUE = 2, 2
CLIENTS = 4 * (SLOTS + QUEUE)
LOAD_S = 4.0
PROMPTS = [([5, 6, 7, 8], 12), ([20, 21], 20), (list(range(40, 60)), 8), ([9], 16)]


def test_overload_gets_200_or_429_and_admitted_outputs_are_exact(reference: Engine) -> None:
    expected = [
        reference_run(reference, p, max_tokens=m, temperature=0, ignore_eos=True).text
        for p, m in PROMPTS
    ]
    statuses: Counter[int] = Counter()
    wrong: list[str] = []
    lock = threading.Lock()
    with serve(make_engine(max_slots=SLOTS, step_delay=0.005), max_queue=QUEUE) as running:
        deadline = time.monotonic() + LOAD_S

        def client(worker: int) -> None:
            with running.http() as http:
                turn = worker
                while time.monotonic() < deadline:
                    prompt, max_tokens = PROMPTS[turn % len(PROMPTS)]
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True}  # fmt: skip
                    response = http.post("/v1/completions", json=body)
                    with lock:
                        statuses[response.status_code] += 1
                        if response.status_code == 429 and not response.headers.get("retry-after"):
                            wrong.append("429 without Retry-After")
                        if response.status_code == 200:
                            text = response.json()["choices"][0]["text"]
                            if text != expected[turn % len(PROMPTS)]:
                                wrong.append(f"prompt {turn % len(PROMPTS)}: {text!r}")
                    turn += 1

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        running.wait_for(lambda: drained(running), timeout=10)
        assert queue_gauges(running) == dict.fromkeys(queue_gauges(running), 0.0)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, statuses  # it really was overloaded
    assert not wrong, wrong[:5]
