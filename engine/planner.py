"""Per round and row: where the drafts come from (the draft model, prompt lookup, none) and
how many. The costs and acceptance estimates it weighs live in engine/gamma.py; this file is
the policy that applies them to a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.gamma import (
    PROBE_ALPHA,
    PROBE_EVERY,
    CostModel,
    OutputLengths,
    best_lookup_length,
    catch_up_pays,
    choose_gamma,
    drafting_saving,
    expected_tokens,
)
from engine.request import Request
from engine.stats import EngineStats

# A draft slot this many tokens behind catches up in its own forward rather than the draft step.
CATCH_UP_ALONE = 3


@dataclass
class RoundPlan:
    """Where each row's drafts come from this round."""

    row_gamma: list[int]  # drafts per row (0: the row just decodes one token)
    draft_rows: list[int] = field(default_factory=list)  # rows the draft model extends
    draft_gamma: int = 0  # draft model steps this round
    lookups: dict[int, list[int]] = field(default_factory=dict)  # row -> prompt-lookup drafts


def draft_gap(request: Request, window: int) -> int:
    """How many tokens after its head the row's draft slot skips: fixed once the slot holds
    anything; for an empty slot, the window ends at the row's present (its first catch-up),
    not at its prompt."""
    if request.draft_len == 0 and window > 0:
        return max(0, request.num_tokens - 1 - window)
    return request.draft_gap


def draft_missing(request: Request, gap: int | None = None) -> int:
    """Tokens before the last one that the row's draft slot (skipping ``gap`` tokens, by
    default as it does now) has not seen."""
    skipped = request.draft_gap if gap is None else gap
    return request.num_tokens - 1 - skipped - request.draft_len


class RoundPlanner:
    """Decides each round's drafts from the engine's running figures (acceptance so far,
    recent output lengths) and the cost model it is handed."""

    def __init__(
        self,
        config: EngineConfig,
        has_draft: bool,
        stats: EngineStats,
        output_lengths: OutputLengths,
    ) -> None:
        self.config = config
        self.has_draft = has_draft
        self.stats = stats
        self.output_lengths = output_lengths

    def plan(self, batch: list[Request], costs: CostModel | None, coming: int) -> RoundPlan:
        """Where this round's drafts come from and how many, per row. ``coming``: requests
        queued or still prefilling, about to join the batch."""
        # A row never drafts past its budget: the round adds at most gamma + 1 tokens.
        caps = [max(0, min(r.gamma, r.max_new_tokens - len(r.output_token_ids) - 1)) for r in batch]
        plan = RoundPlan(row_gamma=[0] * len(batch))
        if max(caps, default=0) == 0:
            return plan
        model_prior = self.stats.model_acceptance(0.7)
        ngram_prior = self.stats.ngram_acceptance(0.5)
        candidates: list[int] = []
        # The round so far, for prompt lookup's choices at the margin: every row verifies at
        # least its last token and emits one.
        round_tokens, round_emitted = len(batch), float(len(batch))
        # Each verify token attends over its row's context: the costs are judged at the mean.
        context = sum(r.num_tokens for r in batch) / len(batch)
        # Judged at the batch size the queued and prefilling requests are about to make.
        soon = min(self.config.max_slots, len(batch) + coming)
        savings: dict[tuple[float, int], float] = {}  # drafting_saving per (alpha, cap)
        for index, request in enumerate(batch):
            if caps[index] == 0:
                continue
            use_model = (
                self.has_draft
                and request.params.proposer != "ngram"
                # Not in a row's first round: the draft's catch-up of the prompt and its steps
                # would hold back the token a streaming client awaits (copied drafts may go).
                and bool(request.output_token_ids)
                and self._draft_ready(
                    request, caps[index], model_prior, soon, context, costs, savings
                )
            )
            proposal = request.lookup.propose(caps[index]) if request.lookup is not None else []
            if proposal and request.matcher is not None:
                # A copy past its first ungrammatical token would be rejected there for sure.
                proposal = proposal[: request.matcher.validate_tokens(proposal)]
            if proposal:
                alpha = request.ngram_acceptance.alpha(ngram_prior)
                rows = len(batch)
                length, rate = best_lookup_length(
                    alpha, len(proposal), costs, round_tokens, round_emitted, context
                )
                if length > 0 and (
                    not use_model
                    or self._lookup_beats_model(
                        request, rate, alpha, model_prior, rows, context, costs
                    )
                ):
                    plan.lookups[index] = proposal[:length]
                    plan.row_gamma[index] = length
                    round_tokens += length
                    round_emitted += expected_tokens(alpha, length) - 1.0
                    continue
            if use_model:
                candidates.append(index)
        if candidates:
            gamma = max(caps[i] for i in candidates)
            if costs is not None:
                alphas = [batch[i].acceptance.alpha(model_prior) for i in candidates]
                row_caps = [caps[i] for i in candidates]
                max_gamma = gamma
                chosen = set(candidates)
                others = [i for i in range(len(batch)) if i not in chosen]
                rest = (len(others), sum(plan.row_gamma[i] + 1 for i in others))
                gamma = choose_gamma(alphas, row_caps, max_gamma, costs, *rest, context=context)
                # A probe keeps a pessimistic estimate honest, but only where drafting could
                # pay at all: at a large batch even a good draft may not beat plain decoding.
                probe = gamma == 0 and choose_gamma(
                    [PROBE_ALPHA] * len(candidates),
                    row_caps,
                    max_gamma,
                    costs,
                    *rest,
                    context=context,
                )
                for i in candidates:
                    request = batch[i]
                    request.rounds_without_draft = 0 if gamma else request.rounds_without_draft + 1
                    if probe and request.rounds_without_draft >= PROBE_EVERY:
                        gamma = 1
                        request.rounds_without_draft = 0
            if gamma > 0:
                plan.draft_rows = candidates
                for i in candidates:
                    plan.row_gamma[i] = min(caps[i], gamma)
                plan.draft_gamma = max(plan.row_gamma[i] for i in candidates)
        return plan

    def _draft_ready(
        self,
        request: Request,
        cap: int,
        model_prior: float,
        rows: int,
        context: float,
        costs: CostModel | None,
        savings: dict[tuple[float, int], float],
    ) -> bool:
        """Whether the draft model may propose for this row. A row that never drafted owes
        its draft slot the prompt, and pays that catch-up only when the tokens it can be
        expected to have left (judged by how long recent requests ran) can repay it: under
        load, or for short answers, often they cannot (prompt lookup may still serve it)."""
        if request.draft_len > 0 or costs is None:
            return True
        missing = draft_missing(request, draft_gap(request, self.config.draft_window))
        if missing < CATCH_UP_ALONE:
            return True
        remaining = self.output_lengths.expected_remaining(
            len(request.output_token_ids), request.max_new_tokens
        )
        alpha = request.acceptance.alpha(model_prior)
        # New rows mostly share the prior's alpha and the cap: one pricing serves them all.
        if (alpha, cap) not in savings:
            savings[alpha, cap] = drafting_saving(alpha, cap, rows, costs, context)
        saving = savings[alpha, cap]
        return catch_up_pays(alpha, cap, remaining, missing, rows, costs, context, saving)

    @staticmethod
    def _lookup_beats_model(
        request: Request,
        lookup_rate: float,
        lookup_alpha: float,
        model_prior: float,
        rows: int,
        context: float,
        costs: CostModel | None,
    ) -> bool:
        """Whether copied drafts promise this row more tokens per second than the draft model
        would, each judged as if the whole batch of ``rows`` made the same choice."""
        model_alpha = request.acceptance.alpha(model_prior)
        if costs is None:
            return lookup_alpha >= model_alpha
        gamma = choose_gamma(
            [model_alpha] * rows, [request.gamma] * rows, request.gamma, costs, context=context
        )
        share = costs.round_seconds(rows, gamma, context=context) / rows
        return lookup_rate >= expected_tokens(model_alpha, gamma) / share
