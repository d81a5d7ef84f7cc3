"""Batched logits warping and counter-based randomness.

Every random number is a pure function of (request seed, absolute token position, purpose), so a
request's output does not depend on which other requests share its batch, and nothing here needs
per-row Python loops or generator state.
"""

from __future__ import annotations

import torch

# Purposes of the uniforms drawn at one token position.
COUPLED_SAMPLE = 0  # per vocabulary entry: the noise a seeded row's draft and target share
DRAFT_SAMPLE = 1
ACCEPT_TEST = 2
TARGET_SAMPLE = 3

_MASK64 = (1 << 64) - 1


def _as_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_signed(0x9E3779B97F4A7C15)
_MIX1 = _as_signed(0xBF58476D1CE4E5B9)
_MIX2 = _as_signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits for a logical shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, which is exactly the arithmetic splitmix64 wants.
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _hash(seeds: torch.Tensor, positions: torch.Tensor, purpose: int) -> torch.Tensor:
    """64 random bits per (seed, position) for ``purpose``; ``seeds`` [B] broadcast against
    ``positions``."""
    while seeds.dim() < positions.dim():
        seeds = seeds.unsqueeze(-1)
    return _splitmix64(_splitmix64(seeds * 4 + purpose) ^ positions)


def uniform(seeds: torch.Tensor, positions: torch.Tensor, purpose: int) -> torch.Tensor:
    """Uniform floats in [0, 1) of dtype float64; ``seeds`` [B] broadcast against ``positions``."""
    bits = _hash(seeds, positions, purpose)
    return _shift_right(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


def race_uniforms(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1) from the top 23 of 64 random bits: (k + 1/2) / 2^23, all
    exact in float32, so no entry is 0 (its logarithm infinite) or 1. (With 24 bits the top
    value rounded to 1.0, an entry of zero noise that won any race it had p > 0 in: one token
    position in ~110 over a 152k vocabulary took a token of any probability.)"""
    return (_shift_right(bits, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def race_noise(keys: torch.Tensor, ids: torch.Tensor | None, n: int) -> torch.Tensor:
    """E ~ Exp(1) [..., n] for each key [...] and token id (``ids`` [n], or 0..n-1): -log of
    ``race_uniforms`` of splitmix64(key ^ id). On CPU the C kernel (engine/csrc/race.c) where
    it loads, which gives an id the same E wherever it lies in the call; torch's ops elsewhere."""
    if keys.device.type == "cpu":
        from engine import cpu_linear  # the C library's loader; it imports torch modules

        noise = cpu_linear.race_noise(keys, ids, n)
        if noise is not None:
            return noise
    if ids is None:
        ids = torch.arange(n, device=keys.device)
    return race_uniforms(_splitmix64(keys[..., None] ^ ids)).log_().neg_()


def coupled_sample(
    probs: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A token of ``probs`` [..., V] per position (``seeds`` [B] broadcast against
    ``positions`` [...]): the winner of an exponential race, argmin of E / p with E ~ Exp(1)
    hashed from (seed, position, token id), an exact sample of p (the Gumbel-max trick with one
    logarithm per entry). Draft and target race with the same E at a position, so a seeded
    row's sampled token is the one the target alone would sample there, whatever was drafted,
    and a draft whose law is close to the target's picks it too.

    ``ids`` [n]: ``probs`` [..., n] covers these token ids only (the ids where p can be > 0,
    e.g. a restricted draft head's), and a token id comes back. Entries with p = 0 never win,
    so the race over them is the race over the whole vocabulary at a fraction of its cost."""
    keys = _hash(seeds, positions, COUPLED_SAMPLE)
    noise = race_noise(keys, ids, probs.shape[-1])
    winner = noise.div_(probs.float()).argmin(-1)
    return winner if ids is None else ids[winner]


# Tokens ranked for top-k and top-p on CPU before any full sort: torch sorts a 152k vocabulary
# in ~11 ms a row there (nearly a draft step), while the top 4096 come in ~1.4 ms. On the
# default target's logits at temperature 0.7 and top-p 0.9 they held the nucleus at 99.5 % of
# positions (at 1.0 and 0.95, 90 %); the rest are sorted whole.
RANKED_HEAD = 4096


def warp_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    use_top_k: bool | None = None,
    use_top_p: bool | None = None,
    min_p: torch.Tensor | None = None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Probabilities after temperature, min-p, top-k and top-p, per row (vLLM's order).

    logits: [B, K, V]; temperature, top_p: [B] float; top_k: [B] long (0 = off); min_p: [B]
    float (0 = off), or None when no row sets it: tokens less likely than min_p times the most
    likely one are dropped.
    Rows with temperature 0 (greedy) get temperature 1 here; the verifier never samples them.
    ``use_top_k`` / ``use_top_p``: whether any row truncates, and ``max_top_k`` the largest k,
    when the caller knows them from host values (else read from the tensors, a wait for the
    device).

    Truncation keeps every token at least as likely as the last one kept: top-k keeps the
    tokens whose logit reaches the k-th largest, top-p those that less likely tokens cannot
    displace (the mass strictly above a token is below top_p). Tokens tied at the edge, which
    bf16 logits make common, thus go or stay together, so no sort's order among ties decides
    and a speculative verify truncates a row exactly as plain decoding does.
    """
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp[:, None, None]
    if min_p is not None:
        probs = scaled.softmax(-1)
        floor = probs.amax(-1, keepdim=True) * min_p[:, None, None]
        scaled = scaled.masked_fill(probs < floor, float("-inf"))
    rows, positions, vocab = scaled.shape
    if use_top_k is None:
        use_top_k = bool(((top_k > 0) & (top_k < vocab)).any())
    if use_top_p is None:
        use_top_p = bool((top_p < 1.0).any())
    if use_top_k or use_top_p:
        head = vocab
        if scaled.device.type == "cpu":  # on CUDA a sort is cheap and a fallback would sync
            if use_top_k and max_top_k is None:
                max_top_k = int(top_k.max())
            head = min(vocab, max(RANKED_HEAD, max_top_k or 0))
        flat = scaled.reshape(-1, vocab)
        row_top_k = top_k.repeat_interleave(positions)
        row_top_p = top_p.repeat_interleave(positions)
        floor, short = _truncation_floor(flat, row_top_k, row_top_p, use_top_k, use_top_p, head)
        if short is not None and bool(short.any()):  # nuclei past the head: sort those rows
            index = short.nonzero().squeeze(-1)
            floor[index] = _truncation_floor(
                flat[index], row_top_k[index], row_top_p[index], use_top_k, use_top_p, vocab
            )[0]
        scaled = scaled.masked_fill(scaled < floor.view(rows, positions, 1), float("-inf"))
    return scaled.softmax(-1)


def _truncation_floor(
    scaled: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    use_top_k: bool,
    use_top_p: bool,
    head: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lowest logit top-k and top-p keep in each row of ``scaled`` [N, V] ([N, 1]), from
    its ``head`` largest logits, and with a head short of the vocabulary, which rows' top-p
    needs more of them [N] (their floor is then not yet known)."""
    vocab = scaled.shape[-1]
    if head < vocab:
        ranked = scaled.topk(head, dim=-1).values
    else:
        ranked = scaled.sort(dim=-1, descending=True).values
    floor = torch.full_like(ranked[:, :1], float("-inf"))
    short = None
    if use_top_k:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
        kth = ranked.gather(-1, (k.clamp(max=head) - 1)[:, None])
        floor = kth.where(k[:, None] <= head, floor)
    if use_top_p:
        # Normalised over what top-k kept, as the reference order (top-k, then top-p) has it.
        if use_top_k:  # without it the floor is -inf, and masking a copy would change nothing
            scaled = scaled.masked_fill(scaled < floor, float("-inf"))
            ranked = ranked.masked_fill(ranked < floor, float("-inf"))
        probs = (ranked - scaled.logsumexp(-1, keepdim=True)).exp()
        mass = probs.cumsum(-1)
        if head < vocab:
            short = (mass[:, -1] < top_p) & (top_p < 1.0)
        # The mass strictly above each rank: that before the first rank of its tie group.
        ranks = torch.arange(head, device=scaled.device).expand_as(ranked)
        starts = torch.ones_like(ranked, dtype=torch.bool)
        starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
        first = torch.where(starts, ranks, 0).cummax(-1).values
        displaced = (mass - probs).gather(-1, first) >= top_p[:, None]
        last_kept = ranked.masked_fill(displaced, float("inf")).amin(-1, keepdim=True)
        floor = torch.maximum(floor, last_kept)
    return floor, short


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of unnormalised ``probs`` [..., V] with uniforms ``u`` [...]."""
    cdf = probs.to(torch.float64).cumsum(-1)
    threshold = (u * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)
