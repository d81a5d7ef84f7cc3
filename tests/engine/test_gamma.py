from __future__ import annotations

import pytest

from engine import gamma
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.gamma import (
    LEARN_RATE,
    AcceptanceEstimate,
    CostModel,
    best_lookup_length,
    catch_up_pays,
    choose_gamma,
    expected_tokens,
)
from tests.engine.test_engine import GREEDY, PROMPTS, hf_greedy, models


def test_expected_tokens_per_round() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_acceptance_estimate_moves_from_prior_to_evidence() -> None:
    estimate = AcceptanceEstimate()
    assert estimate.alpha(prior=0.8) == pytest.approx(0.8)
    for _ in range(50):  # accepts 1 of 4 each round: alpha = 1 / (1 + 1)
        estimate.observe(drafted=4, accepted=1)
    # Discounting keeps about ten rounds of evidence, so the prior still weighs a little.
    assert estimate.alpha(prior=0.8) == pytest.approx(0.5, abs=0.06)
    full = AcceptanceEstimate()
    for _ in range(50):
        full.observe(drafted=4, accepted=4)  # no failure observed at all
    assert full.alpha(prior=0.5) > 0.95


def test_acceptance_estimate_follows_a_change_of_regime() -> None:
    estimate = AcceptanceEstimate()
    for _ in range(100):
        estimate.observe(drafted=4, accepted=0)  # prose the draft cannot guess
    assert estimate.alpha(prior=0.7) < 0.25
    for _ in range(20):
        estimate.observe(drafted=4, accepted=4)  # then code it predicts perfectly
    assert estimate.alpha(prior=0.7) > 0.9


# Memory-bound verify: 1 to 8 tokens cost the same, then cost grows with the tokens.
MEMORY_BOUND = CostModel(target={1: 0.1, 8: 0.1, 16: 0.12, 64: 0.4}, draft={1: 0.02, 8: 0.03})


def test_cheap_verification_and_good_drafts_use_the_longest_gamma() -> None:
    assert choose_gamma([0.9], [6], 6, MEMORY_BOUND) == 6


def test_poor_acceptance_or_costly_drafts_turn_speculation_off() -> None:
    assert choose_gamma([0.05], [6], 6, MEMORY_BOUND) == 0
    costly = CostModel(target={1: 0.1, 8: 0.1}, draft={1: 0.2})
    assert choose_gamma([0.9], [6], 6, costly) == 0


def test_gamma_shrinks_with_load() -> None:
    alone = choose_gamma([0.8], [6], 6, MEMORY_BOUND)
    loaded = choose_gamma([0.8] * 8, [6] * 8, 6, MEMORY_BOUND)
    assert 0 < loaded < alone
    # Verification that costs as much per token as decoding never pays for itself.
    compute_bound = CostModel(target={1: 0.1, 64: 6.4}, draft={1: 0.02, 8: 0.03})
    assert choose_gamma([0.8] * 8, [6] * 8, 6, compute_bound) == 0


def test_caps_limit_rows_not_the_choice() -> None:
    # A row near its token budget cannot use more than its cap; the others still can.
    assert choose_gamma([0.9, 0.9], [0, 6], 6, MEMORY_BOUND) > 0


def test_adaptive_engine_is_still_token_identical() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=6, max_slots=4, max_len=128, adaptive_gamma=True)
    eng = Engine(target, unrelated, config)
    assert eng.costs is not None and eng.costs.target and eng.costs.draft
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy("qwen2")
    same = Engine(target, target, config)
    results = same.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [r.token_ids for r in results] == hf_greedy("qwen2")


def test_lookup_length_follows_acceptance_and_batch_cost() -> None:
    # Batch 1 on a memory-bound machine: verifying all six copied tokens costs nothing extra.
    assert best_lookup_length(0.9, 6, MEMORY_BOUND)[0] == 6
    # A round of 8 rows fills the verify forward: one extra token still pays at 30 %
    # acceptance, two do not, and at 10 % plain decoding beats any copied token.
    assert best_lookup_length(0.3, 6, MEMORY_BOUND, round_tokens=8, round_emitted=8)[0] == 1
    assert best_lookup_length(0.1, 6, MEMORY_BOUND, round_tokens=8, round_emitted=8)[0] == 0
    # Without timings the lookup proposes everything it has.
    assert best_lookup_length(0.1, 4, None) == (4, 0.0)


def test_lookup_length_is_judged_at_the_margin_of_the_round() -> None:
    # The forward is flat to 8 tokens, then the 9th starts another pass. The same row copies
    # up to the knee into a round of 4 tokens, and nothing into a round that is already full.
    knee = CostModel(target={1: 0.1, 8: 0.1, 9: 0.15, 16: 0.16, 64: 0.4})
    length, rate = best_lookup_length(0.5, 6, knee, round_tokens=4, round_emitted=4)
    assert length == 4 and rate == pytest.approx((4 + expected_tokens(0.5, 4) - 1) / 0.1)
    assert best_lookup_length(0.5, 6, knee, round_tokens=8, round_emitted=8)[0] == 0


def test_observed_verify_times_correct_the_table_and_keep_it_monotone() -> None:
    fixed = CostModel(target={1: 0.1, 8: 0.2})
    fixed.observe_verify(8, 1.0)
    assert fixed.target == {1: 0.1, 8: 0.2}  # hand-written tables stay as written
    costs = CostModel(target={1: 0.1, 4: 0.12, 8: 0.2, 16: 0.3}, learn=True)
    costs.observe_verify(8, 0.3)
    assert costs.target[8] == pytest.approx(0.2 + LEARN_RATE * 0.1)
    costs.observe_verify(12, 0.25)  # a new size starts from the interpolation
    assert costs.target[12] == pytest.approx(0.26 + LEARN_RATE * (0.25 - 0.26))
    for _ in range(30):  # a real context makes 4 tokens cost more than the table's 8 did
        costs.observe_verify(4, 0.5)
    sizes = sorted(costs.target)
    assert costs.target[4] == pytest.approx(0.5, abs=0.01)
    assert all(costs.target[a] <= costs.target[b] for a, b in zip(sizes, sizes[1:], strict=False))
    for _ in range(30):  # and a fast 16 pulls every smaller size down with it
        costs.observe_verify(16, 0.05)
    assert max(costs.target[s] for s in sizes if s < 16) <= costs.target[16] < 0.06


def test_measure_warms_up_and_keeps_the_table_monotone(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    durations = iter([9.0] + [0.3] * 3 + [0.2] * 3 + [0.25, 0.5, 0.4])  # warm-up first
    calls = []

    def forward(size: int) -> None:
        calls.append(size)
        clock[0] += next(durations)

    monkeypatch.setattr(gamma.time, "perf_counter", lambda: clock[0])
    table = gamma.measure(forward, [1, 2, 4])
    assert calls == [1] + [1] * 3 + [2] * 3 + [4] * 3
    # The slow cold call is not timed; 1 token that timed slower than 2 takes 2's time.
    assert table == pytest.approx({1: 0.2, 2: 0.2, 4: 0.25})


def test_catch_up_pays_only_when_the_remaining_tokens_repay_it() -> None:
    from dataclasses import replace

    costs = replace(MEMORY_BOUND, draft_catch_up=0.005)  # 256 tokens: 1.28 s
    # Alone, with 60 tokens to go and a good draft, a prompt-sized catch-up pays for itself...
    assert catch_up_pays(0.8, 6, remaining=60, missing=256, rows=1, costs=costs)
    # ... but not for a short answer, nor for a row whose draft is poor.
    assert not catch_up_pays(0.8, 6, remaining=4, missing=256, rows=1, costs=costs)
    assert not catch_up_pays(0.05, 6, remaining=60, missing=256, rows=1, costs=costs)
    # A small catch-up (a few tokens behind) pays where a prompt-sized one does not.
    assert catch_up_pays(0.8, 6, remaining=4, missing=8, rows=1, costs=costs)
    # Under load each row's saving shrinks while every row's catch-up stalls the whole batch.
    assert not catch_up_pays(0.8, 6, remaining=60, missing=256, rows=8, costs=costs)


def test_rows_that_do_not_draft_make_drafting_dearer() -> None:
    # One drafting row alone drafts a lot; beside seven rows that only wait for it (and fill
    # the verify forward), far less or not at all.
    alone = choose_gamma([0.8], [6], 6, MEMORY_BOUND)
    beside_seven = choose_gamma([0.8], [6], 6, MEMORY_BOUND, other_rows=7, other_tokens=7)
    assert alone > 0 and beside_seven < alone
    many_waiting = CostModel(target={1: 0.1, 8: 0.12, 64: 1.0}, draft={1: 0.05})
    assert choose_gamma([0.8], [6], 6, many_waiting) > 0
    assert choose_gamma([0.8], [6], 6, many_waiting, other_rows=7, other_tokens=7) == 0


def test_every_round_teaches_the_engine_its_verify_cost() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=4, max_slots=2, max_len=128, adaptive_gamma=True)
    eng = Engine(target, unrelated, config)
    assert eng.costs is not None and eng.costs.learn
    seen: list[tuple[int, float]] = []
    learn = eng.costs.observe_verify
    eng.costs.observe_verify = lambda tokens, seconds: (seen.append((tokens, seconds)),
                                                        learn(tokens, seconds))  # fmt: skip
    rounds = []
    eng.on_round = rounds.append
    eng.generate(PROMPTS, GREEDY)
    assert [t for t, _ in seen] == [r.batch_size + sum(r.drafted) for r in rounds]
    assert [s for _, s in seen] == [r.verify_seconds for r in rounds]
    sizes = sorted(eng.costs.target)
    assert all(
        eng.costs.target[a] <= eng.costs.target[b] for a, b in zip(sizes, sizes[1:], strict=False)
    )
