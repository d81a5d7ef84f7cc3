"""Repetition penalties, logit bias and min_tokens, applied to whole rounds of draft and verify
logits.

OpenAI's presence and frequency penalties count the tokens a request has generated; vLLM's
repetition penalty also counts its prompt; ``logit_bias`` adds a fixed value per token id. A
verify position scores the token after the drafts before it, so it must see those drafts as
generated: position t of a round counts the request's output plus drafts 0..t-1. The target
and the draft then penalise the same sequences, and the rejection rule, which only compares
the two distributions it is given, stays exact for the penalised target. ``min_tokens`` works
the same way: position t generates output token len(output) + t, and until that reaches
min_tokens the ids that would end the request get no probability.

The counts live on the device, one row per slot, and grow by the tokens each round emitted
(read from the host lists the round already produced): no per-token Python work, and nothing
at all while no request in the batch uses these settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import SamplingParams
from engine.device import to_device
from engine.request import Request


@dataclass
class RowPenalties:
    """One round's logit adjustments, a row per batch row (rows without settings are neutral).
    The penalty fields are None when no row penalises (only ``min_tokens`` is at work), the
    stop fields when no row is still short of its ``min_tokens``."""

    counts: torch.Tensor | None  # [B, V] float: each token's count in the row's output so far
    prompt_seen: torch.Tensor | None  # [B, V] bool: in the prompt (repetition penalty only)
    bias: torch.Tensor | None  # [B, V] float
    presence: torch.Tensor | None  # [B]
    frequency: torch.Tensor | None  # [B]
    repetition: torch.Tensor | None  # [B]
    until: torch.Tensor | None = None  # [B] long: output tokens still owed before a stop
    stop_mask: torch.Tensor | None = None  # [B, V] bool: the ids that would end the row

    def select(self, index: torch.Tensor) -> RowPenalties:
        def rows(table: torch.Tensor | None) -> torch.Tensor | None:
            return None if table is None else table[index]

        return RowPenalties(
            counts=rows(self.counts),
            prompt_seen=rows(self.prompt_seen),
            bias=rows(self.bias),
            presence=rows(self.presence),
            frequency=rows(self.frequency),
            repetition=rows(self.repetition),
            until=rows(self.until),
            stop_mask=rows(self.stop_mask),
        )

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, T, V] adjusted. ``tokens`` [B, S] (S >= T - 1) are tokens generated
        after the counted output: position t sees the first S - T + 1 + t of them (a verify
        passes its G drafts for G + 1 positions; a draft step the s tokens drafted so far)."""
        positions = logits.shape[1]
        seen_before = tokens.shape[1] - positions + 1  # tokens that position 0 sees
        scored = logits.float()
        if self.counts is not None:
            scored = self._penalise(scored, tokens, seen_before)
        if self.until is not None:
            assert self.stop_mask is not None
            generated = seen_before + torch.arange(positions, device=logits.device)
            early = generated[None, :] < self.until[:, None]  # [B, T]
            scored = scored.masked_fill(
                early[:, :, None] & self.stop_mask[:, None, :], float("-inf")
            )
        return scored

    def _penalise(
        self, scored: torch.Tensor, tokens: torch.Tensor, seen_before: int
    ) -> torch.Tensor:
        assert self.counts is not None and self.presence is not None
        assert self.frequency is not None
        rows, positions, vocab = scored.shape
        counts = self.counts[:, None, :].expand(rows, positions, vocab)
        # (position, token index) pairs from host sizes: no wait for the device.
        pairs = [(t, j) for t in range(positions) for j in range(seen_before + t)]
        if pairs:
            device = scored.device
            at_position = to_device([t for t, _ in pairs], device, torch.long)
            at_token = to_device([j for _, j in pairs], device, torch.long)
            row = torch.arange(rows, device=device)[:, None].expand(rows, len(pairs))
            counts = counts.clone()
            ones = torch.ones((), device=device).expand(rows, len(pairs))
            counts.index_put_(
                (row, at_position.expand(rows, -1), tokens[:, at_token]), ones, accumulate=True
            )
        if self.bias is not None:
            scored = scored + self.bias[:, None, :]
        if self.repetition is not None:
            occurred = counts > 0
            if self.prompt_seen is not None:
                occurred = occurred | self.prompt_seen[:, None, :]
            penalty = self.repetition[:, None, None]
            repeated = torch.where(scored > 0, scored / penalty, scored * penalty)
            scored = torch.where(occurred, repeated, scored)
        return (
            scored
            - self.frequency[:, None, None] * counts
            - self.presence[:, None, None] * (counts > 0).float()
        )


_NEUTRAL = SamplingParams()  # read only: what a row without these settings stands for


def penalised(params: SamplingParams) -> bool:
    return bool(
        params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
        or params.logit_bias
    )


class PenaltyState:
    """Per-slot device rows of output counts, prompt tokens and biases, allocated on first use.

    A slot's rows belong to the request that set them up; a new occupant resets them. Each
    round adds the output tokens the slot's request produced since they were last counted.
    """

    def __init__(
        self, slots: int, vocab: int, device: torch.device, eos_ids: set[int] | None = None
    ) -> None:
        self.slots, self.vocab, self.device = slots, vocab, device
        self.eos_ids = sorted(eos_ids or ())
        self.counts: torch.Tensor | None = None
        self.prompt_seen: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        # Compared by identity: request ids need not be unique across generate() calls.
        self.owner: list[Request | None] = [None] * slots
        self.counted = [0] * slots

    def _allocate(self) -> None:
        shape = (self.slots, self.vocab)
        self.counts = torch.zeros(shape, device=self.device)
        self.prompt_seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.bias = torch.zeros(shape, device=self.device)

    def _ints(self, values: list[int]) -> torch.Tensor:
        return to_device(values, self.device, torch.long)

    def rows(self, batch: list[Request]) -> RowPenalties | None:
        """The round's adjustments, or None when no row has any."""
        until = [max(0, r.params.min_tokens - len(r.output_token_ids)) for r in batch]
        penalties = self._penalties(batch)
        if not any(until):
            return penalties
        # The ids that would end each row still short of min_tokens: masked until it is not.
        stop_rows: list[int] = []
        stop_tokens: list[int] = []
        for row, (request, owed) in enumerate(zip(batch, until, strict=True)):
            if owed:
                params = request.params
                ids = set(params.stop_token_ids) | set(() if params.ignore_eos else self.eos_ids)
                ids = {i for i in ids if 0 <= i < self.vocab}
                stop_rows += [row] * len(ids)
                stop_tokens += sorted(ids)
        stop_mask = torch.zeros((len(batch), self.vocab), dtype=torch.bool, device=self.device)
        if stop_rows:
            at = (self._ints(stop_rows), self._ints(stop_tokens))
            stop_mask.index_put_(at, torch.ones((), dtype=torch.bool, device=self.device))
        if penalties is None:
            penalties = RowPenalties(None, None, None, None, None, None)
        penalties.until = self._ints(until)
        penalties.stop_mask = stop_mask
        return penalties

    def _penalties(self, batch: list[Request]) -> RowPenalties | None:
        """The round's penalties and bias, or None when no row has any (then nothing is
        allocated)."""
        active = [penalised(r.params) for r in batch]
        if not any(active):
            return None
        if self.counts is None:
            self._allocate()
        assert self.counts is not None and self.prompt_seen is not None and self.bias is not None
        reset: list[int] = []
        seen_slots: list[int] = []
        seen_tokens: list[int] = []
        bias_slots: list[int] = []
        bias_tokens: list[int] = []
        bias_values: list[float] = []
        count_slots: list[int] = []
        count_tokens: list[int] = []
        for request, on in zip(batch, active, strict=True):
            if not on:
                continue
            slot, params = request.slot, request.params
            if self.owner[slot] is not request:
                self.owner[slot], self.counted[slot] = request, 0
                reset.append(slot)
                if params.repetition_penalty != 1.0:
                    seen_slots += [slot] * len(request.prompt_token_ids)
                    seen_tokens += request.prompt_token_ids
                for token, value in (params.logit_bias or {}).items():
                    bias_slots.append(slot)
                    bias_tokens.append(token)
                    bias_values.append(value)
            new = request.output_token_ids[self.counted[slot] :]
            self.counted[slot] = len(request.output_token_ids)
            count_slots += [slot] * len(new)
            count_tokens += new
        if reset:
            index = self._ints(reset)
            for table in (self.counts, self.prompt_seen, self.bias):
                table.index_fill_(0, index, 0)
        if seen_slots:
            at = (self._ints(seen_slots), self._ints(seen_tokens))
            self.prompt_seen.index_put_(at, torch.ones((), dtype=torch.bool, device=self.device))
        if bias_slots:
            at = (self._ints(bias_slots), self._ints(bias_tokens))
            self.bias.index_put_(at, to_device(bias_values, self.device, torch.float32))
        if count_slots:
            at = (self._ints(count_slots), self._ints(count_tokens))
            ones = torch.ones(len(count_slots), device=self.device)
            self.counts.index_put_(at, ones, accumulate=True)

        # Rows without settings read their slot's rows too (one gather for the batch): zero
        # penalties, a zeroed bias and a repetition penalty of 1 keep them neutral whatever a
        # previous occupant left there.
        index = self._ints([r.slot for r in batch])
        params = [r.params if on else _NEUTRAL for r, on in zip(batch, active, strict=True)]
        uses_bias = any(p.logit_bias for p in params)
        uses_repetition = any(p.repetition_penalty != 1.0 for p in params)
        bias = None
        if uses_bias:
            with_bias = to_device([float(bool(p.logit_bias)) for p in params], self.device)
            bias = self.bias[index] * with_bias[:, None]
        return RowPenalties(
            counts=self.counts[index],
            prompt_seen=self.prompt_seen[index] if uses_repetition else None,
            bias=bias,
            presence=to_device([p.presence_penalty for p in params], self.device),
            frequency=to_device([p.frequency_penalty for p in params], self.device),
            repetition=(
                to_device([p.repetition_penalty for p in params], self.device)
                if uses_repetition
                else None
            ),
        )
