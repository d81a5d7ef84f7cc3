from __future__ import annotations

from engine.config import EngineConfig, SamplingParams
from engine.gamma import CostModel, OutputLengths
from engine.ngram import PromptLookup
from engine.planner import CATCH_UP_ALONE, RoundPlanner, draft_gap, draft_missing
from engine.request import Request
from engine.stats import EngineStats

# Verifying costs what one token does up to 8 tokens; a draft step a tenth of that.
CHEAP_VERIFY = CostModel(target={1: 0.1, 8: 0.1, 64: 0.8}, draft={1: 0.01, 8: 0.02})


def request(
    prompt: list[int],
    output: list[int] | None = None,
    gamma: int = 4,
    max_new: int = 50,
    draft_len: int = 0,
    proposer: str = "auto",
    lookup: bool = False,
) -> Request:
    row = Request(
        request_id="r",
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=max_new, temperature=0, proposer=proposer),
        seed=0,
        gamma=gamma,
        max_new_tokens=max_new,
        output_token_ids=list(output or []),
        draft_len=draft_len,
    )
    if lookup:
        row.lookup = PromptLookup(3)
        row.lookup.extend(row.token_ids)
    return row


def planner(has_draft: bool = True, **settings) -> RoundPlanner:
    config = EngineConfig(gamma=4, max_slots=4, max_len=256, **settings)
    return RoundPlanner(config, has_draft, EngineStats(), OutputLengths())


def test_without_costs_every_ready_row_drafts_up_to_its_budget() -> None:
    rows = [
        request([1, 2, 3], [4], draft_len=3),
        request([1, 2, 3], [4], gamma=2, draft_len=3),  # its own gamma is lower
        request([1, 2, 3], [4, 5, 6], max_new=5, draft_len=5),  # 2 tokens left: 1 draft + 1
        request([1, 2, 3], [4, 5], max_new=3, draft_len=4),  # 1 token left: no room to draft
    ]
    plan = planner().plan(rows, costs=None, coming=0)
    assert plan.row_gamma == [4, 2, 1, 0]
    assert plan.draft_rows == [0, 1, 2] and plan.draft_gamma == 4
    assert plan.lookups == {}


def test_the_model_waits_for_a_rows_first_token_and_its_proposer() -> None:
    rows = [
        request([1, 2, 3]),  # first round: its first token comes before any draft
        request([1, 2, 3], [4], proposer="ngram", draft_len=3),  # asked for prompt lookup only
        request([1, 2, 3], [4], draft_len=3),
    ]
    plan = planner().plan(rows, costs=None, coming=0)
    assert plan.draft_rows == [2] and plan.row_gamma == [0, 0, 4]
    assert planner(has_draft=False).plan(rows, costs=None, coming=0).row_gamma == [0, 0, 0]


def test_a_repeating_context_takes_copied_drafts() -> None:
    # "5 6 7" occurred before, followed by "8 9": prompt lookup proposes them for free.
    repeating = request([5, 6, 7, 8, 9, 1, 5, 6], [7], lookup=True, proposer="ngram")
    plan = planner().plan([repeating], costs=CHEAP_VERIFY, coming=0)
    assert plan.lookups == {0: [8, 9, 1, 5]} and plan.row_gamma == [4]
    assert plan.draft_rows == []


class Grammar:
    """Stands in for a row's matcher: allows the first ``valid`` tokens of anything."""

    def __init__(self, valid: int) -> None:
        self.valid = valid

    def validate_tokens(self, tokens: list[int]) -> int:
        return min(self.valid, len(tokens))


def test_a_copy_is_cut_at_its_first_ungrammatical_token() -> None:
    plans = []
    for valid in (2, 0):
        repeating = request([5, 6, 7, 8, 9, 1, 5, 6], [7], lookup=True, proposer="ngram")
        repeating.matcher = Grammar(valid)  # type: ignore[assignment]
        plans.append(planner().plan([repeating], costs=CHEAP_VERIFY, coming=0))
    assert plans[0].lookups == {0: [8, 9]} and plans[0].row_gamma == [2]
    assert plans[1].lookups == {} and plans[1].row_gamma == [0]


def test_adaptive_gamma_drafts_less_as_the_batch_fills() -> None:
    # A verify of up to 8 tokens costs what one does: alone a row drafts its all; four rows
    # drafting 4 each would verify 20 tokens, dearer per token than what they gain.
    costs = CostModel(target={1: 0.1, 8: 0.1, 16: 0.2, 32: 0.4}, draft={1: 0.01, 4: 0.02})
    alone = planner().plan([request([1, 2, 3], [4], draft_len=3)], costs, coming=0)
    batch = [request([1, 2, 3], [4], draft_len=3) for _ in range(4)]
    full = planner().plan(batch, costs, coming=0)
    assert alone.draft_gamma == 4
    assert full.draft_gamma < alone.draft_gamma


def test_a_new_rows_catch_up_is_judged_at_the_coming_batch() -> None:
    # A 200-token prompt the draft never saw: copying it pays for one row with 50 tokens to go,
    # not once three more requests are about to share every round.
    costs = CostModel(
        target={1: 0.1, 8: 0.1, 64: 0.8}, draft={1: 0.01, 8: 0.02}, draft_catch_up={1: 0.003}
    )
    new_row = request(list(range(200)), [7])
    assert planner().plan([new_row], costs, coming=0).draft_rows == [0]
    assert planner().plan([new_row], costs, coming=3).draft_rows == []


def test_draft_window_bookkeeping() -> None:
    row = request(list(range(100)), [100, 101])
    # An empty slot with a 32-token window skips all but the latest 32 tokens before the last.
    assert draft_gap(row, window=32) == 102 - 1 - 32
    assert draft_gap(row, window=0) == 0  # no window: the whole context
    assert draft_missing(row, draft_gap(row, 32)) == 32
    row.draft_gap, row.draft_len = 69, 30
    assert draft_gap(row, window=32) == 69  # fixed once the slot holds anything
    assert draft_missing(row) == 2 < CATCH_UP_ALONE
