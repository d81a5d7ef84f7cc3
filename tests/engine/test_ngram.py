from __future__ import annotations

import random

import pytest

from engine.ngram import PromptLookup


def _lookup(tokens: list[int], max_ngram: int = 3, min_ngram: int = 2) -> PromptLookup:
    lookup = PromptLookup(max_ngram, min_ngram)
    lookup.extend(tokens)
    return lookup


def _brute_force(tokens: list[int], limit: int, sizes: list[int]) -> list[int]:
    for n in sizes:
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - 1, n - 1, -1):  # latest earlier occurrence first
            if tokens[start - n : start] == suffix:
                return tokens[start : start + limit]
    return []


def test_copies_what_followed_the_latest_occurrence() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert _lookup(tokens).propose(3) == [4, 5, 1]
    assert _lookup(tokens).propose(1) == [4]


def test_prefers_the_longest_matching_ngram() -> None:
    # (2, 3) last occurred before 7; the 3-gram (1, 2, 3) occurred before 8.
    tokens = [1, 2, 3, 8, 8, 5, 2, 3, 7, 0, 1, 2, 3]
    assert _lookup(tokens).propose(2) == [8, 8]
    assert _lookup(tokens, max_ngram=2).propose(2) == [7, 0]


def test_no_match_and_the_suffix_itself_do_not_count() -> None:
    assert _lookup([1, 2, 3, 4, 5]).propose(4) == []
    assert _lookup([1, 2]).propose(4) == []
    assert _lookup([5, 5]).propose(3) == []  # no 2-gram occurred before the suffix
    assert _lookup([5, 5, 5]).propose(3) == [5]  # (5, 5) occurred at 0..1, followed by 5
    assert _lookup([1, 2, 1, 2]).propose(0) == []


def test_incremental_extension_matches_brute_force() -> None:
    rng = random.Random(0)
    lookup = PromptLookup(3, 1)
    tokens: list[int] = []
    for _ in range(300):
        new = [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        tokens += new
        lookup.extend(new)
        assert lookup.propose(5) == _brute_force(tokens, 5, [3, 2, 1])


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        PromptLookup(1, 2)
    with pytest.raises(ValueError):
        PromptLookup(3, 0)


def test_a_prediction_is_proposed_first_from_where_the_context_ends() -> None:
    lookup = _lookup([7, 8, 9, 1, 2])
    lookup.predict([7, 8, 9, 1, 2], [30, 31, 32, 33])
    # The context's last tokens lead into the prediction's start, though it never occurred.
    assert lookup.propose(3) == [30, 31, 32] and lookup.proposed_from_prediction
    lookup.extend([30, 31])
    assert lookup.propose(5) == [32, 33]
    # No match in the prediction: the context's own n-grams still serve.
    lookup.extend([7, 8])
    assert lookup.propose(2) == [9, 1] and not lookup.proposed_from_prediction


def test_a_prediction_is_walked_forward_through_its_repeats() -> None:
    prediction = [1, 2, 3, 50, 1, 2, 3, 60, 1, 2, 3, 70]
    lookup = _lookup([9, 9])
    lookup.predict([9, 9], prediction)
    assert lookup.propose(3) == [1, 2, 3]
    lookup.extend([1, 2, 3])
    assert lookup.propose(2) == [50, 1]  # the first occurrence, not the latest
    lookup.extend([50, 1, 2, 3])
    assert lookup.propose(2) == [60, 1]  # then the one after it
    lookup.extend([60, 1, 2, 3])
    assert lookup.propose(2) == [70]
    lookup.extend([80, 1, 2, 3])  # the output left the prediction: the latest occurrence serves
    assert lookup.propose(2) == [70]
