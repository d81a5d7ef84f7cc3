from __future__ import annotations

from engine.config import SamplingParams
from engine.request import Request, Status
from engine.scheduler import Scheduler


def _request(name: str) -> Request:
    return Request(name, [1, 2], SamplingParams(), seed=0, gamma=0, max_new_tokens=4)


def test_fifo_admission_into_lowest_free_slots() -> None:
    scheduler = Scheduler(max_slots=2)
    requests = [_request(str(i)) for i in range(3)]
    for r in requests:
        scheduler.add(r)
    admitted = scheduler.admit()
    assert [r.request_id for r in admitted] == ["0", "1"]
    assert [r.slot for r in admitted] == [0, 1]
    assert requests[2].status is Status.WAITING and scheduler.num_free_slots == 0
    scheduler.release(requests[0])
    assert requests[0].finished and requests[0].slot == -1
    (third,) = scheduler.admit()
    assert third is requests[2] and third.slot == 0
    assert [r.request_id for r in scheduler.batch()] == ["2", "1"]


def test_find_and_remove_waiting() -> None:
    scheduler = Scheduler(max_slots=1)
    a, b = _request("a"), _request("b")
    scheduler.add(a)
    scheduler.add(b)
    scheduler.admit()
    assert scheduler.find("b") is b and scheduler.find("a") is a and scheduler.find("x") is None
    scheduler.remove_waiting(b)
    assert not scheduler.waiting and b.finished


def test_token_budget_limits_one_admission() -> None:
    scheduler = Scheduler(max_slots=4)
    lengths = [300, 500, 100, 50]
    requests = [
        Request(str(i), [1] * n, SamplingParams(), seed=0, gamma=0, max_new_tokens=4)
        for i, n in enumerate(lengths)
    ]
    for r in requests:
        scheduler.add(r)
    assert [r.request_id for r in scheduler.admit(token_budget=600)] == ["0", "1"]
    assert [r.request_id for r in scheduler.admit(token_budget=50)] == ["2"]  # at least one
    assert [r.request_id for r in scheduler.admit(token_budget=0)] == ["3"]  # 0: no limit
