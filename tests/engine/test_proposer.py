from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import torch

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.proposer import DraftRows, RowSampling
from engine.runner import RaggedBatch
from tests.engine.conftest import VOCAB, perturbed, tiny_model


def _draft_logits(engine: Engine, context: list[int]) -> torch.Tensor:
    assert engine.proposer is not None
    runner = engine.proposer.runner
    runner.prefill(RaggedBatch([context[:-1]], [0], [0], [len(context) - 1]))
    return engine.proposer.logits(RaggedBatch([context[-1:]], [0], [len(context) - 1], [1]))[0]


def test_restricted_head_scores_its_subset_and_the_context_ids_it_is_given() -> None:
    target = tiny_model("qwen2")
    draft = perturbed(target, 0.1)
    config = EngineConfig(gamma=3, max_slots=2, max_len=64, prefix_cache=False)
    full = Engine(target, draft, config)
    restricted = Engine(target, draft, replace(config, draft_vocab=50))
    proposer = restricted.proposer
    assert proposer is not None and proposer.subset is not None
    context = [5, 7, 120, 9, 300, 11]
    outside = proposer.outside(context + [40, 301])
    assert outside == {120, 300, 301}  # ids below 50 are in the subset
    reference = _draft_logits(full, context)
    kept = set(range(50)) | restricted.special_ids
    # From nothing outside to some and back: a batch whose rare-token rows finished.
    for ids in (set(), outside, set()):
        proposer.also_score(ids)
        logits = _draft_logits(restricted, context)
        scored = torch.isfinite(logits).nonzero().flatten().tolist()
        assert set(scored) == kept | ids
        # A seeded row's race covers exactly the ids the head can propose.
        assert proposer.support is not None
        assert sorted(proposer.support.tolist()) == scored
        # Same weights, same numbers: the restricted head is a selection of the full one.
        torch.testing.assert_close(logits[scored], reference[scored])
    assert len(scored) < VOCAB


def test_an_unrestricted_head_has_nothing_outside() -> None:
    target = tiny_model("qwen2")
    engine = Engine(target, perturbed(target, 0.1), EngineConfig(gamma=2, max_slots=1))
    assert engine.proposer is not None and engine.proposer.outside(range(VOCAB)) == set()


def test_a_seeded_rows_draft_race_over_the_heads_ids_drafts_what_a_whole_race_does() -> None:
    target = tiny_model("qwen2")
    draft = perturbed(target, 0.05)
    config = EngineConfig(gamma=4, max_slots=3, max_len=96, draft_vocab=120)
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    prompts = [[5, 200, 7, 250, 9], [30, 31, 32], [300, 301, 5, 6]]  # ids past 120 too
    restricted, whole = Engine(target, draft, config), Engine(target, draft, config)
    assert whole.proposer is not None and restricted.proposer is not None
    proposer = whole.proposer
    original = proposer.also_score

    def whole_race(ids: Collection[int]) -> None:
        original(ids)
        proposer.support = None  # the race then runs over all 320 ids

    proposer.also_score = whole_race  # type: ignore[method-assign]
    proposer.support = None
    expected = [c.token_ids for c in whole.generate(prompts, params)]
    assert [c.token_ids for c in restricted.generate(prompts, params)] == expected
    assert restricted.stats.drafted == whole.stats.drafted > 0
    assert restricted.stats.accepted == whole.stats.accepted > 0


def test_drafts_return_distributions_only_where_a_row_samples_by_rejection() -> None:
    target = tiny_model("qwen2")
    engine = Engine(target, perturbed(target, 0.05), EngineConfig(gamma=3, max_len=64))
    assert engine.proposer is not None
    seeded = SamplingParams(temperature=0.8, seed=5)
    unseeded = SamplingParams(temperature=0.8)
    greedy = SamplingParams(temperature=0.0)
    mixed = RowSampling.build([greedy, seeded, unseeded], [1, 2, 3], torch.device("cpu"))
    assert (mixed.coupled_rows, mixed.rejection_rows) == ([1], [2])
    # A subset keeps each row's kind at its new index.
    subset = mixed.select([2, 1], torch.tensor([2, 1]))
    assert (subset.coupled_rows, subset.rejection_rows) == ([1], [0])

    def propose(params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = DraftRows(
            slots=[0, 1], catch_up=[[5, 6, 7], [9, 10]], draft_lens=[0, 0],
            next_positions=[3, 2], first_positions=[3, 2], outside_ids=[],
        )  # fmt: skip
        sampling = RowSampling.build(params, [11, 12], torch.device("cpu"))
        assert engine.proposer is not None
        return engine.proposer.propose(rows, 3, sampling)

    tokens, probs = propose([greedy, seeded])
    assert probs is None  # greedy and coupled rows need no draft distributions
    with_rejection, probs = propose([greedy, unseeded])
    assert probs is not None and probs.shape == (2, 3, VOCAB)
    assert torch.equal(tokens[0], with_rejection[0])  # the greedy row drafts its argmax
    # A seeded row drafts its race's tokens whatever its neighbours sample by.
    beside_rejection, probs = propose([unseeded, seeded])
    assert probs is not None and torch.equal(tokens[1], beside_rejection[1])
