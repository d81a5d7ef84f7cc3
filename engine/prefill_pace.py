"""Sizes prompt chunks in seconds: a chunk of 512 prompt tokens stalls the decoding rows for a
few milliseconds on a GPU but for ~11 s on a 2-core CPU, so no token count suits both."""

from __future__ import annotations

from dataclasses import dataclass

# Chunks are whole multiples of this many tokens: GEMMs like round shapes, and a chunk that
# followed every wobble of the measured pace would vary from step to step for nothing.
CHUNK_GRAIN = 32
# Weight of the pace so far against a new prefill: steady, yet it follows a machine that gets
# busier or contexts that grow.
DECAY = 0.8


@dataclass
class PrefillPace:
    """The target's measured seconds per prompt token, over its recent prefill forwards."""

    seconds_per_token: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        # A forward of a few tokens is mostly fixed cost: it would make prompts look slower
        # per token than they are.
        if tokens < CHUNK_GRAIN or seconds <= 0.0:
            return
        pace = seconds / tokens
        if self.seconds_per_token is None:
            self.seconds_per_token = pace
        else:
            self.seconds_per_token = DECAY * self.seconds_per_token + (1.0 - DECAY) * pace

    def chunk_tokens(self, max_tokens: int, seconds: float) -> int:
        """Prompt tokens a step may compute while rows decode: about ``seconds`` at the
        measured pace, in whole grains, at least one grain, at most ``max_tokens`` (0: whole
        prompts). Before any prefill was timed, and with ``seconds`` 0, ``max_tokens``."""
        if not max_tokens or not seconds or self.seconds_per_token is None:
            return max_tokens
        fits = int(seconds / self.seconds_per_token) // CHUNK_GRAIN * CHUNK_GRAIN
        return max(CHUNK_GRAIN, min(max_tokens, fits))
