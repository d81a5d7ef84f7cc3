from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from engine.config import SamplingParams
from engine.gamma import AcceptanceEstimate
from engine.ngram import PromptLookup

if TYPE_CHECKING:
    import llguidance


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Target log-probability of one token, plus the top-N alternatives at that position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestStats:
    rounds: int = 0  # speculative rounds this request took part in
    drafted: int = 0  # draft tokens proposed for it
    accepted: int = 0  # draft tokens the target accepted
    generated: int = 0  # tokens emitted
    # Prompt tokens whose K/V were not computed for this request: a previous request left them
    # in its slot, or another running request's slot held them (engine/scheduler.py).
    cached_tokens: int = 0
    # Drafts copied from the request's predicted output that the target accepted / rejected.
    prediction_accepted: int = 0
    prediction_rejected: int = 0
    # acceptance_histogram[k] = rounds in which exactly k draft tokens were accepted
    acceptance_histogram: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        """Tokens emitted per round: accepted drafts plus the target's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the request's life so far, queueing and prefill included."""
        end = self.finish_time if self.finish_time is not None else time.monotonic()
        elapsed = end - self.arrival_time
        return self.generated / elapsed if elapsed > 0 else 0.0


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" while finished
    prompt_token_ids: list[int]
    num_generated: int  # total tokens generated so far
    stats: RequestStats
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, on the first output
    error: str | None = None


@dataclass
class Request:
    """Host-side state of one request: plain integers and lists, no tensors."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved seed (random when the caller gave none)
    gamma: int  # effective draft length for this request
    max_new_tokens: int  # params.max_tokens clamped to the slot's room
    status: Status = Status.WAITING
    slot: int = -1
    output_token_ids: list[int] = field(default_factory=list)
    target_len: int = 0  # tokens whose K/V is valid in the target slot
    draft_len: int = 0  # tokens whose K/V is valid in the draft slot
    # The draft slot holds token_ids[:head] + token_ids[head + draft_gap:] (head: the config's
    # draft_head): the whole context while draft_gap is 0, else a window of it.
    draft_gap: int = 0
    emitted_text_len: int = 0  # characters of the completion already handed out
    # Incremental detokenization: the text of output_token_ids[:read_offset], settled, and where
    # the next decode starts (a few tokens back, so merges and leading spaces come out right).
    settled_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    # Characters of the text of the first min_tokens tokens: stop strings count past them.
    stop_floor: int | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    prompt_logprobs_pending: bool = False
    prompt_logprobs_cache: list[TokenLogprob | None] | None = None
    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)  # draft model's
    ngram_acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    rounds_without_draft: int = 0  # consecutive rounds adaptive gamma gave this row no drafts
    lookup: PromptLookup | None = None  # n-gram index of the request's tokens (prompt lookup)
    # Its tokens that a restricted draft head lacks (DraftProposer.outside), from the first
    # outside_scanned tokens.
    outside_ids: set[int] = field(default_factory=set)
    outside_scanned: int = 0
    # Structured output: where the grammar stands after the emitted tokens (engine/grammar.py).
    matcher: llguidance.LLMatcher | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_from(self, start: int) -> list[int]:
        """``token_ids[start:]`` without copying the whole sequence (called every round)."""
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len :]
        return self.prompt_token_ids[start:] + self.output_token_ids

    @property
    def cached_len(self) -> int:
        """Prompt tokens whose K/V the slot held at admission, or copied since (prefix cache)."""
        return self.stats.cached_tokens

    @property
    def prefilled(self) -> bool:
        """Whether the target slot holds every token but the last (which the next round
        feeds): the row may decode. False while its prompt is still being prefilled."""
        return self.target_len == self.num_tokens - 1

    @property
    def last_token(self) -> int:
        return (self.output_token_ids or self.prompt_token_ids)[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
