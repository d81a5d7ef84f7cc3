from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from engine import gamma
from engine.calibration import CATCH_UP_CALIBRATION, calibrate
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.gamma import (
    LENGTH_HISTORY,
    AcceptanceEstimate,
    CostModel,
    OutputLengths,
    best_lookup_length,
    catch_up_pays,
    choose_gamma,
    drafting_saving,
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


def test_attention_over_the_context_makes_extra_tokens_dearer() -> None:
    costs = replace(MEMORY_BOUND, attention=5e-6)
    assert costs.verify_seconds(8) == MEMORY_BOUND.verify_seconds(8)  # context 0
    long = 1500.0  # each token attends 1500 keys: +7.5 ms
    assert costs.verify_seconds(8, long) == pytest.approx(0.1 + 8 * 0.0075)
    assert MEMORY_BOUND.verify_seconds(8, long) == MEMORY_BOUND.verify_seconds(8)
    # A row in a full round copies a token at an empty context, not at a long one...
    full = {"round_tokens": 8, "round_emitted": 8.0}
    assert best_lookup_length(0.3, 6, costs, **full)[0] == 1
    assert best_lookup_length(0.3, 6, costs, **full, context=long)[0] == 0
    # ... and a lone row drafts fewer tokens, though it still drafts.
    at_long = choose_gamma([0.8], [6], 6, costs, context=long)
    assert 0 < at_long < choose_gamma([0.8], [6], 6, costs)


def test_rounds_teach_the_overhead_and_the_attention_cost() -> None:
    fixed = CostModel(target={1: 0.1, 64: 0.4}, attention=1e-6)
    fixed.observe_verify(8, 8000, 1.0)
    assert (fixed.attention, fixed.overhead) == (1e-6, 0.0)  # hand-written models stay so
    costs = CostModel(target={1: 0.1, 64: 0.4}, attention=1e-6, learn=True)
    overhead, attention = 0.03, 4e-6
    for tokens, context in [(8, 1000), (12, 1500), (1, 400), (16, 800), (2, 150)] * 20:
        keys = tokens * context
        table = costs._lookup(costs.target, tokens)
        costs.observe_verify(tokens, keys, table + overhead + attention * keys)
    assert costs.overhead == pytest.approx(overhead, rel=0.1)
    assert costs.attention == pytest.approx(attention, rel=0.1)
    expected = costs.target[1] + 0.3 * 7 / 63 + 0.062
    assert costs.verify_seconds(8, 1000) == pytest.approx(expected, 0.1)
    costs.observe_verify(8, 8000, 5.0)  # one stalled round (a page fault storm, another process)
    assert costs.attention < 2 * attention and costs.overhead < 2 * overhead
    for _ in range(100):  # rounds faster than the table, whatever the context
        costs.observe_verify(8, 8000, 0.06)
    assert costs.attention == 0.0 and -0.05 <= costs.overhead < 0.0


def test_measure_warms_up_and_keeps_the_table_monotone(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    # Warm-up first, then three turns over the sizes 1, 2, 4.
    durations = iter([9.0] + [0.3, 0.2, 0.25] + [0.3, 0.2, 0.5] + [0.3, 0.2, 0.4])
    calls = []

    def forward(size: int) -> None:
        calls.append(size)
        clock[0] += next(durations)

    monkeypatch.setattr(gamma.time, "perf_counter", lambda: clock[0])
    table = gamma.measure(forward, [1, 2, 4])
    assert calls == [1] + [1, 2, 4] * 3
    # The slow cold call is not timed; 1 token that timed slower than 2 takes 2's time.
    assert table == pytest.approx({1: 0.2, 2: 0.2, 4: 0.25})


def test_measure_keeps_the_slope_through_a_slow_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward costs 0.1 s plus 0.01 s a token, but the machine runs at half speed for a
    while (another process): timed size by size, that spell would fall on the largest sizes
    alone and make extra tokens look five times dearer than they are."""
    clock, calls = [0.0], [0]

    def forward(size: int) -> None:
        calls[0] += 1
        slow = 2.0 if 6 <= calls[0] <= 12 else 1.0
        clock[0] += slow * (0.1 + 0.01 * size)

    monkeypatch.setattr(gamma.time, "perf_counter", lambda: clock[0])
    table = gamma.measure(forward, [1, 2, 4, 8])
    assert table == pytest.approx({1: 0.11, 2: 0.12, 4: 0.14, 8: 0.18})


def _timed_forwards(
    monkeypatch: pytest.MonkeyPatch, cost: Callable[[int], float]
) -> tuple[Callable[[int], None], list[int]]:
    """A forward that takes ``cost(size)`` seconds on a fake clock, and the sizes it ran."""
    clock, calls = [0.0], []

    def forward(size: int) -> None:
        calls.append(size)
        clock[0] += cost(size)

    monkeypatch.setattr(gamma.time, "perf_counter", lambda: clock[0])
    return forward, calls


def test_verify_sizes_past_the_linear_regime_are_extrapolated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU verify is compute-bound past a few tokens (23 ms a token on the default target):
    sizes past 16 are not timed, and the table's extrapolation prices them as timing would."""
    sizes = gamma.calibration_sizes(48)

    def cost(size: int) -> float:
        return max(0.1, 0.023 * size)

    forward, calls = _timed_forwards(monkeypatch, cost)
    table = gamma.measure_until_linear(forward, sizes)
    assert max(calls) == 16 and sorted(table) == [s for s in sizes if s <= 16]
    costs = gamma.CostModel(target=table)
    for size in (24, 32, 48):
        assert costs.verify_seconds(size) == pytest.approx(cost(size))


def test_verify_sizes_are_timed_while_cost_per_token_still_falls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU verify costs nearly the same at 16 tokens as at 48: extrapolating 16 tokens'
    cost per token would price 48 at three times what it is, so every size is timed."""
    sizes = gamma.calibration_sizes(48)

    def cost(size: int) -> float:
        return 0.01 + 0.0001 * size

    forward, calls = _timed_forwards(monkeypatch, cost)
    table = gamma.measure_until_linear(forward, sizes)
    assert sorted(table) == sizes and set(calls) == set(sizes)
    assert table == pytest.approx({size: cost(size) for size in sizes})
    # Below the threshold nothing changes: one measure over the sizes given.
    forward, calls = _timed_forwards(monkeypatch, cost)
    assert sorted(gamma.measure_until_linear(forward, [1, 2, 4])) == [1, 2, 4]
    assert calls == [1] + [1, 2, 4] * 3


def test_measure_waits_for_an_asynchronous_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA forward returns once its kernels are queued: timed without waiting for the
    device, every size would look free."""
    clock, queued = [0.0], [0.0]

    def forward(size: int) -> None:
        queued[0] += 0.01 * size  # work the device will do

    def synchronize() -> None:
        clock[0] += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(gamma.time, "perf_counter", lambda: clock[0])
    assert gamma.measure(forward, [1, 8]) == {1: 0.0, 8: 0.0}
    queued[0] = 0.0
    assert gamma.measure(forward, [1, 8], synchronize=synchronize) == pytest.approx(
        {1: 0.01, 8: 0.08}
    )


def test_catch_up_pays_only_when_the_remaining_tokens_repay_it() -> None:
    costs = replace(MEMORY_BOUND, draft_catch_up={1: 0.005})  # 256 tokens: 1.28 s
    # Alone, with 60 tokens to go and a good draft, a prompt-sized catch-up pays for itself...
    assert catch_up_pays(0.8, 6, remaining=60, missing=256, rows=1, costs=costs)
    # ... but not for a short answer, nor for a row whose draft is poor.
    assert not catch_up_pays(0.8, 6, remaining=4, missing=256, rows=1, costs=costs)
    assert not catch_up_pays(0.05, 6, remaining=60, missing=256, rows=1, costs=costs)
    # A small catch-up (a few tokens behind) pays where a prompt-sized one does not.
    assert catch_up_pays(0.8, 6, remaining=4, missing=8, rows=1, costs=costs)
    # Under load each row's saving shrinks while every row's catch-up stalls the whole batch.
    assert not catch_up_pays(0.8, 6, remaining=60, missing=256, rows=8, costs=costs)


def test_choose_gamma_prices_rows_alike_as_one_group() -> None:
    # Rows with the same (alpha, cap) are summed as count x one row's tokens: the choice must
    # be the brute-force argmax of emitted tokens per second over every row.
    alphas = [0.9, 0.5, 0.9, 0.9, 0.2, 0.5]
    caps = [6, 6, 6, 2, 6, 6]
    for costs in (MEMORY_BOUND, replace(MEMORY_BOUND, draft={1: 0.05, 8: 0.09})):
        for other_rows, other_tokens in ((0, 0), (3, 7)):
            rows = list(zip(alphas, caps, strict=True))
            rates = [
                (other_rows + sum(expected_tokens(a, min(g, c)) for a, c in rows))
                / costs.round_seconds(len(alphas), g, other_tokens)
                for g in range(7)
            ]
            best = max(range(7), key=lambda g: (rates[g], -g))
            assert choose_gamma(alphas, caps, 6, costs, other_rows, other_tokens) == best


def test_drafting_saving_is_what_catch_up_weighs() -> None:
    costs = replace(MEMORY_BOUND, draft_catch_up={1: 0.005})
    # A poor draft saves nothing; a good one saves plain round time minus drafted time per token.
    assert drafting_saving(0.05, 6, 1, costs) == 0.0
    saving = drafting_saving(0.8, 6, 1, costs)
    gamma = choose_gamma([0.8], [6], 6, costs)
    per_token = costs.round_seconds(1, gamma) / expected_tokens(0.8, gamma)
    assert saving == pytest.approx(costs.round_seconds(1, 0) - per_token)
    assert saving > 0
    # Handing the saving in (as the engine does for rows alike) changes no verdict.
    for remaining, missing in ((60, 256), (4, 256), (4, 8)):
        alone = catch_up_pays(0.8, 6, remaining, missing, 1, costs)
        assert catch_up_pays(0.8, 6, remaining, missing, 1, costs, saving=saving) == alone
    assert not catch_up_pays(0.8, 6, 60, 8, 1, costs, saving=0.0)


def test_catch_up_cost_follows_its_table_not_a_rate_per_token() -> None:
    # A long copy runs a faster GEMM per token than a short one: priced at the short copy's
    # rate a 256-token window would not pay for itself here; at its own measured cost it does.
    short_rate = replace(MEMORY_BOUND, draft_catch_up={16: 0.32})  # 20 ms a token
    table = replace(MEMORY_BOUND, draft_catch_up={16: 0.32, 256: 2.0})  # 7.8 ms a token
    assert table.catch_up_seconds(256) == pytest.approx(2.0)
    assert table.catch_up_seconds(136) == pytest.approx(1.16)  # interpolated
    assert table.catch_up_seconds(512) == pytest.approx(4.0)  # linear past the largest
    assert table.catch_up_seconds(4) == pytest.approx(0.32)  # a forward costs its smallest
    assert CostModel().catch_up_seconds(100) == 0.0
    assert not catch_up_pays(0.8, 6, remaining=60, missing=256, rows=1, costs=short_rate)
    assert catch_up_pays(0.8, 6, remaining=60, missing=256, rows=1, costs=table)
    # B rows catch up in one forward of B windows.
    assert not catch_up_pays(0.8, 6, remaining=60, missing=256, rows=8, costs=table)


def test_rows_that_do_not_draft_make_drafting_dearer() -> None:
    # One drafting row alone drafts a lot; beside seven rows that only wait for it (and fill
    # the verify forward), far less or not at all.
    alone = choose_gamma([0.8], [6], 6, MEMORY_BOUND)
    beside_seven = choose_gamma([0.8], [6], 6, MEMORY_BOUND, other_rows=7, other_tokens=7)
    assert alone > 0 and beside_seven < alone
    many_waiting = CostModel(target={1: 0.1, 8: 0.12, 64: 1.0}, draft={1: 0.05})
    assert choose_gamma([0.8], [6], 6, many_waiting) > 0
    assert choose_gamma([0.8], [6], 6, many_waiting, other_rows=7, other_tokens=7) == 0


def test_every_round_teaches_the_engine_its_attention_cost() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=4, max_slots=2, max_len=128, adaptive_gamma=True)
    eng = Engine(target, unrelated, config)
    assert eng.costs is not None and eng.costs.learn
    seen: list[tuple[int, float, float]] = []
    learn = eng.costs.observe_verify

    def spy(tokens: int, keys: float, seconds: float) -> None:
        seen.append((tokens, keys, seconds))
        learn(tokens, keys, seconds)

    eng.costs.observe_verify = spy  # type: ignore[method-assign]
    rounds = []
    eng.on_round = rounds.append
    eng.generate(PROMPTS, GREEDY)
    assert [t for t, _, _ in seen] == [r.batch_size + sum(r.drafted) for r in rounds]
    assert [s for _, _, s in seen] == [r.verify_seconds for r in rounds]
    # Each verified token attends at least the prompt of the shortest row.
    assert all(keys >= tokens * min(map(len, PROMPTS)) for tokens, keys, _ in seen)
    assert eng.costs.attention >= 0.0


def test_calibration_waits_for_the_device_after_every_timed_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=2, max_slots=2, max_len=64, adaptive_gamma=True)
    eng = Engine(target, unrelated, config)
    calls: list[int] = []
    real_forward = eng.target.forward
    events: list[str] = []
    eng.target.forward = lambda *a, **k: (events.append("target"), real_forward(*a, **k))[1]
    eng.target.synchronize = lambda: events.append("wait target")  # type: ignore[method-assign]
    runner = eng.proposer.runner
    # The proposer's step reads the draft's logits: any will do for timing.
    runner.forward = lambda *a, **k: (events.append("draft"), torch.zeros(1, 8))[1]
    runner.prefill = lambda *a, **k: events.append("draft")
    runner.synchronize = lambda: events.append("wait draft")  # type: ignore[method-assign]
    calibrate(eng.target, eng.proposer, config.max_slots, eng.gamma)
    # Every forward, timed or warm-up, is followed by a wait on its own model's device before
    # the clock is read (the two models could sit on different devices).
    pairs = list(zip(events[::2], events[1::2], strict=True))
    assert pairs and all(wait == f"wait {model}" for model, wait in pairs)
    verify_sizes = len(gamma.calibration_sizes(min(eng.target.capacity, 2 * 3)))
    draft_sizes = len(gamma.calibration_sizes(2))
    # Per table a warm-up, then 3 timed calls per size: verify, attention (2 sizes), draft
    # steps, the draft catch-up.
    assert events.count("wait target") == (1 + 3 * verify_sizes) + (1 + 3 * 2)
    catch_up_sizes = len([t for t in CATCH_UP_CALIBRATION if t <= eng.target.capacity])
    assert events.count("wait draft") == (1 + 3 * draft_sizes) + (1 + 3 * catch_up_sizes)
    # What a wait is: nothing on CPU, torch.cuda.synchronize on a CUDA device.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    runner = Engine(target, None, EngineConfig(gamma=0, max_slots=1, max_len=64)).target
    runner.synchronize()
    assert calls == []
    runner.device = torch.device("cuda", 0)
    runner.synchronize()
    assert calls == [torch.device("cuda", 0)]


def test_expected_remaining_tokens_from_recent_lengths() -> None:
    lengths = OutputLengths()
    # Too few known lengths: the request's own cap.
    for length in (10, 20, 30):
        lengths.observe(length, stopped=True)
    assert lengths.expected_remaining(0, 64) == 64
    lengths.observe(64, stopped=False)  # ran to its cap: at least 64
    # Mean of min(L, 64): (10 + 20 + 30 + 64) / 4.
    assert lengths.expected_remaining(0, 64) == 31
    # Past 10 tokens the first no longer counts, and a shorter cap bounds the others.
    lengths.observe(40, stopped=True)
    assert lengths.expected_remaining(10, 64) == (10 + 20 + 54 + 30) / 4
    assert lengths.expected_remaining(10, 35) == (10 + 20 + 25 + 25) / 4
    # A row that outlived what is known falls back to its cap.
    assert lengths.expected_remaining(50, 64) == 14
    # Only the latest requests are remembered.
    for _ in range(LENGTH_HISTORY):
        lengths.observe(5, stopped=True)
    assert len(lengths.finished) == LENGTH_HISTORY
    assert lengths.expected_remaining(0, 64) == 5
