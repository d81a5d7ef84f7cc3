from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RoundRecord:
    """What one speculative round did; handed to ``Engine.on_round`` for metrics."""

    batch_size: int
    gamma: int  # the round's largest draft length
    drafted: list[int]  # per row
    ngram: list[bool]  # per row: drafts came from prompt lookup, not the draft model
    accepted: list[int]  # per row
    emitted: list[int]  # per row, after stop conditions
    draft_seconds: float
    verify_seconds: float


@dataclass
class EngineStats:
    """Engine-wide counters since start-up."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    ngram_drafted: int = 0  # the share of drafted/accepted that came from prompt lookup
    ngram_accepted: int = 0
    # Row-rounds whose drafts a rejection cut short (of them, by prompt lookup): with the
    # accepted counts, the evidence for the per-token acceptance probability (engine/gamma.py).
    rejections: int = 0
    ngram_rejections: int = 0
    row_rounds: int = 0  # sum over rounds of the batch size
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_requests: int = 0
    busy_seconds: float = 0.0  # time spent inside step()
    started: float = field(default_factory=time.monotonic)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def model_acceptance(self, prior: float, weight: float = 20.0) -> float:
        """Per-token acceptance probability of the draft model's own proposals, the alpha of
        engine/gamma.py: successes over successes plus rejections, starting from ``prior``
        (worth ``weight`` observations) so that a few early rejections cannot condemn the
        draft. Not accepted / drafted: the tokens after a rejection are never judged, so that
        ratio falls with gamma (0.28 at gamma 8 on Spec-Bench where alpha was 0.71)."""
        accepted = self.accepted - self.ngram_accepted
        rejections = self.rejections - self.ngram_rejections
        return (accepted + weight * prior) / (accepted + rejections + weight)

    def ngram_acceptance(self, prior: float, weight: float = 20.0) -> float:
        """model_acceptance for prompt-lookup proposals."""
        accepted, rejections = self.ngram_accepted, self.ngram_rejections
        return (accepted + weight * prior) / (accepted + rejections + weight)

    @property
    def mean_accepted_per_round(self) -> float:
        """Tokens a request gains per round: accepted drafts plus the target's own token."""
        return (self.accepted + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0

    def summary(self) -> str:
        return (
            f"rounds={self.rounds} drafted={self.drafted} accepted={self.accepted} "
            f"acceptance={self.acceptance_rate:.1%} "
            f"tokens/round={self.mean_accepted_per_round:.2f} "
            f"generated={self.generated_tokens} tok/s={self.tokens_per_second:.2f}"
        )
