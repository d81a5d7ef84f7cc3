from __future__ import annotations

from engine.config import SamplingParams
from engine.request import Request, Status
from engine.scheduler import Scheduler, common_prefix


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


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert common_prefix([5] * 100 + [1], [5] * 100 + [2]) == 100
    assert common_prefix([], [1]) == 0 and common_prefix([2], [1]) == 0


def _prompted(name: str, prompt: list[int], **params) -> Request:
    return Request(name, prompt, SamplingParams(**params), seed=0, gamma=0, max_new_tokens=4)


def test_a_request_goes_to_the_free_slot_holding_the_longest_prefix_of_its_prompt() -> None:
    scheduler = Scheduler(max_slots=3, reuse_prefixes=True)
    first = [_prompted("a", [1, 2, 3, 4]), _prompted("b", [7, 8, 9]), _prompted("c", [1, 2])]
    for r in first:
        scheduler.add(r)
    scheduler.admit()
    assert [r.cached_len for r in first] == [0, 0, 0]  # nothing resident yet
    for r, valid in zip(first, [6, 3, 1], strict=True):
        r.output_token_ids = [5, 6]
        r.target_len = valid  # the K/V its slot holds: the first `valid` tokens
        scheduler.release(r)
    # a's slot holds 1 2 3 4 5 6: a follow-up turn shares all of it
    follow_up = _prompted("d", [1, 2, 3, 4, 5, 6, 10, 11])
    other = _prompted("e", [7, 8, 1, 1])
    unrelated = _prompted("f", [42, 43])
    for r in (follow_up, other, unrelated):
        scheduler.add(r)
    scheduler.admit()
    assert (follow_up.slot, follow_up.cached_len) == (0, 6)
    assert (other.slot, other.cached_len) == (1, 2)
    assert (unrelated.slot, unrelated.cached_len) == (2, 0)
    assert follow_up.stats.cached_tokens == 6


def test_prefix_reuse_leaves_the_last_prompt_token_and_prompt_logprobs_alone() -> None:
    scheduler = Scheduler(max_slots=1, reuse_prefixes=True)
    first = _prompted("a", [1, 2, 3])
    scheduler.add(first)
    scheduler.admit()
    first.output_token_ids, first.target_len = [4], 4
    scheduler.release(first)
    same = _prompted("b", [1, 2, 3, 4])
    scheduler.add(same)
    scheduler.admit()
    assert same.cached_len == 3  # the last token is fed by the first round, never cached
    same.target_len = 4
    scheduler.release(same)
    wants_logprobs = _prompted("c", [1, 2, 3, 4], prompt_logprobs=1)
    wants_logprobs.prompt_logprobs_pending = True
    scheduler.add(wants_logprobs)
    scheduler.admit()
    assert wants_logprobs.cached_len == 0  # needs every prompt position's logits


def test_without_prefix_reuse_nothing_is_cached() -> None:
    scheduler = Scheduler(max_slots=1)
    first = _prompted("a", [1, 2, 3])
    scheduler.add(first)
    scheduler.admit()
    first.target_len = 3
    scheduler.release(first)
    again = _prompted("b", [1, 2, 3, 4])
    scheduler.add(again)
    scheduler.admit()
    assert again.cached_len == 0


def _prompt_request(name: str, prompt: list[int], target_len: int = 0) -> Request:
    request = Request(name, prompt, SamplingParams(), seed=0, gamma=0, max_new_tokens=4)
    request.target_len = target_len
    return request


def test_a_running_slot_lends_the_longest_prefix_it_holds_beyond_the_requests_own() -> None:
    scheduler = Scheduler(max_slots=4, reuse_prefixes=True)
    document = list(range(10, 30))
    partly = _prompt_request("partly", document + [1, 2], target_len=12)  # still prefilling
    decoding = _prompt_request("decoding", document + [3], target_len=21)
    decoding.output_token_ids = [7, 8]  # its slot holds the prompt and one output token
    asking = _prompt_request("asking", document + [4, 5, 6])
    for request in (partly, decoding, asking):
        scheduler.add(request)
    scheduler.admit()
    donor, shared = scheduler.prefix_donor(asking)
    assert donor is decoding and shared == len(document)
    # Only beyond what the request already has; and never from itself.
    asking.target_len = len(document)
    assert scheduler.prefix_donor(asking) == (None, len(document))
    # A whole prompt but its last token, which the first round feeds.
    twin = _prompt_request("twin", document + [3])
    scheduler.add(twin)
    scheduler.admit()
    assert scheduler.prefix_donor(twin) == (decoding, len(document))
    # Prompt logprobs need the forward over every prompt position; without reuse, nothing.
    twin.prompt_logprobs_pending = True
    assert scheduler.prefix_donor(twin) == (None, 0)
    off = Scheduler(max_slots=2, reuse_prefixes=False)
    for request in (_prompt_request("a", document + [3], 20), _prompt_request("b", document)):
        off.add(request)
    off.admit()
    assert off.prefix_donor(off.running[1]) == (None, 0)


def test_a_prompt_waits_for_a_prefill_that_will_compute_most_of_what_it_lacks() -> None:
    document = list(range(10, 40))  # 30 tokens
    first = _prompt_request("first", document + [1])
    same = _prompt_request("same", document + [1])
    other_question = _prompt_request("other", document + [2, 3, 4])
    # Shares a 2-token header with the document: waiting would save it little.
    short = _prompt_request("short", [10, 11, 99, 98, 97, 96, 95])
    unrelated = _prompt_request("unrelated", [5, 6, 7])
    prefilling = [first, same, other_question, short, unrelated]
    scheduler = Scheduler(max_slots=5, reuse_prefixes=True)
    assert scheduler.prefix_followers(prefilling) == {"same", "other"}
    assert Scheduler(max_slots=5).prefix_followers(prefilling) == set()  # without reuse
    # The one further along leads, whatever the order of admission.
    same.target_len = 8
    assert scheduler.prefix_followers(prefilling) == {"first", "other"}
    # A follower that needs its own forward over the prompt does not wait.
    other_question.prompt_logprobs_pending = True
    assert scheduler.prefix_followers(prefilling) == {"first"}
