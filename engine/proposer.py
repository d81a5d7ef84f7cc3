from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import torch

from engine.config import SamplingParams
from engine.cpu_linear import linear, patch_linear
from engine.device import to_device
from engine.grammar import DraftConstraint
from engine.penalties import RowPenalties
from engine.runner import ModelRunner, RaggedBatch
from engine.sampling import DRAFT_SAMPLE, coupled_sample, sample_from, uniform, warp_probs

# Most context ids a restricted draft head scores beside its subset (a bound for very long
# contexts; a Spec-Bench RAG prompt has about a hundred).
MAX_OUTSIDE = 4096


@dataclass
class RowSampling:
    """Device tensors describing how each row of a round samples, and the host facts that
    decide which warping steps run (read on the host, they cost no wait for the device)."""

    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    temperature: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long
    top_p: torch.Tensor  # [B] float
    seeds: torch.Tensor  # [B] long
    host_top_k: list[int]
    host_top_p: list[float]
    min_p: torch.Tensor | None = None  # [B] float, when any row sets it
    penalties: RowPenalties | None = None  # repeats and logit bias, when any row sets them
    # Sampling rows whose caller chose the seed: they sample by engine.sampling.coupled_sample.
    coupled_rows: list[int] = field(default_factory=list)
    # Sampling rows without one: rejection sampling decides them (engine/verifier.py). Where
    # there are none, that path (its draft distributions, residuals and samples) is skipped.
    rejection_rows: list[int] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        device: torch.device,
        penalties: RowPenalties | None = None,
    ) -> RowSampling:
        top_k = [max(p.top_k, 0) for p in params]
        top_p = [p.top_p for p in params]
        return cls(
            greedy=to_device([p.greedy for p in params], device),
            all_greedy=all(p.greedy for p in params),
            temperature=to_device([p.temperature for p in params], device),
            top_k=to_device(top_k, device),
            top_p=to_device(top_p, device),
            seeds=to_device(seeds, device),
            host_top_k=top_k,
            host_top_p=top_p,
            min_p=to_device([p.min_p for p in params], device)
            if any(p.min_p for p in params)
            else None,
            penalties=penalties,
            coupled_rows=[i for i, p in enumerate(params) if not p.greedy and p.seed is not None],
            rejection_rows=[i for i, p in enumerate(params) if not p.greedy and p.seed is None],
        )

    def coupled_index(self, device: torch.device) -> torch.Tensor | None:
        """``coupled_rows`` on the device, or None when there are none."""
        return to_device(self.coupled_rows, device) if self.coupled_rows else None

    def penalise(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, T, V] after penalties and bias (``RowPenalties.apply``), or as they
        are when no row sets any."""
        if self.penalties is None:
            return logits
        return self.penalties.apply(logits, tokens)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        max_top_k = max((k for k in self.host_top_k if 0 < k < vocab), default=0)
        use_top_p = any(p < 1.0 for p in self.host_top_p)
        return warp_probs(
            logits,
            self.temperature,
            self.top_k,
            self.top_p,
            max_top_k > 0,
            use_top_p,
            self.min_p,
            max_top_k,
        )

    def select(self, rows: list[int], index: torch.Tensor) -> RowSampling:
        """The sampling of a subset of the rows (``index``: ``rows`` on the device)."""
        coupled, rejection = set(self.coupled_rows), set(self.rejection_rows)
        return RowSampling(
            greedy=self.greedy[index],
            all_greedy=self.all_greedy,
            temperature=self.temperature[index],
            top_k=self.top_k[index],
            top_p=self.top_p[index],
            seeds=self.seeds[index],
            host_top_k=[self.host_top_k[i] for i in rows],
            host_top_p=[self.host_top_p[i] for i in rows],
            min_p=None if self.min_p is None else self.min_p[index],
            penalties=None if self.penalties is None else self.penalties.select(index),
            coupled_rows=[j for j, i in enumerate(rows) if i in coupled],
            rejection_rows=[j for j, i in enumerate(rows) if i in rejection],
        )


@dataclass
class DraftRows:
    """Host view of the rows a draft pass extends."""

    slots: list[int]
    catch_up: list[list[int]]  # tokens the draft slot has not seen yet, ending with the last one
    draft_lens: list[int]  # valid K/V length of each draft slot
    # Where the first draft token lands in the draft slot, which may hold only a window of the
    # sequence, and in the sequence itself (what the per-position random numbers are keyed on).
    next_positions: list[int]
    first_positions: list[int]
    # Ids a restricted draft head lacks that occur in these rows' contexts: scored beside it.
    outside_ids: Collection[int] = ()


class DraftProposer:
    """Proposes ``gamma`` tokens per row with a small model on its own slot cache.

    The first step feeds every token the draft slot is missing (one normally, two after a round
    in which all drafts were accepted, more after rounds that skipped the draft), so the draft is
    never re-prefilled; later steps feed one token per row without leaving the device.
    """

    def __init__(
        self,
        runner: ModelRunner,
        target_vocab: int,
        vocab_subset: torch.Tensor | None = None,
        weights: str = "bf16",
    ) -> None:
        self.runner = runner
        self.target_vocab = target_vocab
        self.subset: torch.Tensor | None = None
        self._kept: frozenset[int] = frozenset()  # the subset's ids, on the host
        # Context ids scored beside the subset this pass, with their rows of the full head.
        self._outside: tuple[int, ...] = ()
        self._outside_index = torch.empty(0, dtype=torch.long, device=runner.device)
        self._outside_head = runner.lm_head.weight.detach()[:0]
        # The ids a draft distribution can put mass on (None: all): a seeded row's race runs
        # over these alone (engine.sampling.coupled_sample).
        self.support: torch.Tensor | None = None
        if vocab_subset is not None:
            self._kept = frozenset(vocab_subset.tolist())
            # A head over a few frequent tokens (FR-Spec): the full draft head is a large share
            # of a small model's weights. Outside the subset the draft proposes nothing (q = 0).
            self.subset = vocab_subset.to(runner.device)
            weight = runner.lm_head.weight[self.subset].contiguous()
            self.subset_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.subset_head.weight = torch.nn.Parameter(weight, requires_grad=False)
            # In the weights the rest of the draft streams: a bf16 head of 32k rows would cost
            # what the full int4 head does, and save nothing.
            self.subset_head = patch_linear(self.subset_head, weights)
            self.support = self.subset

    def outside(self, tokens: Iterable[int]) -> set[int]:
        """The ids among ``tokens`` that the restricted head lacks (none without one). A
        context's own rare tokens (a document's names, code identifiers) are the likeliest
        rare tokens of its continuation: most of the target's tokens past the first 32768 ids
        on Spec-Bench occur earlier in the prompt or the output."""
        if self.subset is None:
            return set()
        limit = min(self.target_vocab, self.runner.vocab_size)
        return {t for t in tokens if t not in self._kept and 0 <= t < limit}

    def also_score(self, ids: Collection[int]) -> None:
        """Scores ``ids`` (from ``outside``) beside the restricted head from now on; the rows
        of the full head they need are gathered only when the set changes."""
        key = tuple(sorted(ids)[:MAX_OUTSIDE])
        if key == self._outside or self.subset is None:
            return
        self._outside = key
        self._outside_index = to_device(list(key), self.runner.device, torch.long)
        self._outside_head = self.runner.lm_head.weight.detach()[self._outside_index].contiguous()
        self.support = torch.cat([self.subset, self._outside_index])

    def logits(self, batch: RaggedBatch) -> torch.Tensor:
        """Draft logits [B, target vocab] at each row's last token."""
        if self.subset is None:
            return self._fit_vocab(self.runner.forward(batch))
        hidden = self.runner.forward(batch, output="hidden")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, to_device(batch.num_new, hidden.device) - 1]
        sub_logits = self.subset_head(last).float()
        logits = sub_logits.new_full((sub_logits.shape[0], self.target_vocab), float("-inf"))
        logits.index_copy_(1, self.subset, sub_logits)
        if self._outside:
            # A few hundred rows at most: the bf16 rows of the full head serve as they are.
            outside_logits = linear(last, self._outside_head).float()
            logits.index_copy_(1, self._outside_index, outside_logits)
        return logits

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        # Same tokenizer, but embedding tables are often padded to different sizes.
        extra = self.target_vocab - logits.shape[-1]
        if extra > 0:
            return torch.nn.functional.pad(logits, (0, extra), value=float("-inf"))
        return logits[..., : self.target_vocab]

    def propose(
        self,
        rows: DraftRows,
        gamma: int,
        sampling: RowSampling,
        constraint: DraftConstraint | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns draft tokens [B, gamma] and, where some row samples by rejection, their
        warped distributions [B, gamma, V] (else None: greedy and coupled rows need none); with
        ``constraint``, what the rows' grammars allow."""
        device = self.runner.device
        self.also_score(rows.outside_ids)
        first_position = to_device(rows.first_positions, device)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        batch = RaggedBatch(
            rows.catch_up, rows.slots, rows.draft_lens, [len(t) for t in rows.catch_up]
        )
        drafted = torch.zeros((len(rows.slots), 0), dtype=torch.long, device=device)
        coupled = sampling.coupled_index(device)
        for step in range(gamma):
            logits = self.logits(batch)  # [B, V]
            if sampling.penalties is not None:
                # Penalised as the target will score these positions, so greedy drafts agree.
                logits = sampling.penalise(logits[:, None], drafted)[:, 0]
            if constraint is not None:
                logits = constraint.mask(logits)
            token = logits.argmax(-1)
            if not sampling.all_greedy:
                step_probs = sampling.warp(logits[:, None])[:, 0]
                if sampling.rejection_rows:
                    u = uniform(sampling.seeds, first_position + step, DRAFT_SAMPLE)
                    token = torch.where(sampling.greedy, token, sample_from(step_probs, u))
                    probs.append(step_probs)
                if coupled is not None:
                    if self.support is None:
                        raced = step_probs[coupled]
                    else:  # one gather of the rows' support, not a copy of their whole rows
                        raced = step_probs[coupled[:, None], self.support]
                    token[coupled] = coupled_sample(
                        raced,
                        sampling.seeds[coupled],
                        first_position[coupled] + step,
                        self.support,
                    )
            tokens.append(token)
            if constraint is not None and step + 1 < gamma:
                constraint.consume(token.tolist())  # the grammars walk on the host
            if sampling.penalties is not None:
                drafted = torch.cat([drafted, token[:, None]], dim=1)
            if step + 1 < gamma:
                starts = [n + step for n in rows.next_positions]
                batch = RaggedBatch(token[:, None], rows.slots, starts, [1] * len(rows.slots))
        if constraint is not None:
            constraint.rollback()
        draft_probs = torch.stack(probs, 1) if probs else None
        return torch.stack(tokens, 1), draft_probs
