from __future__ import annotations

from typing import NamedTuple

import torch

from engine.sampling import ACCEPT_TEST, TARGET_SAMPLE, coupled_sample, sample_from, uniform


class Verdict(NamedTuple):
    accepted_len: torch.Tensor  # [B] draft tokens accepted per row
    tokens: torch.Tensor  # [B, G+1] accepted drafts, then the target's token at accepted_len
    emitted_len: torch.Tensor  # [B] accepted_len + 1


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised max(p - q, 0): what the target still owes after the draft's proposal."""
    residual = (p - q).clamp_(min=0)
    # p == q exactly leaves no residual mass; rejection then has probability 0 anyway.
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    target_probs: torch.Tensor | None,
    row_gamma: torch.Tensor,
    greedy: torch.Tensor,
    seeds: torch.Tensor,
    first_position: torch.Tensor,
    coupled_rows: torch.Tensor | None = None,
    rejection: bool = True,
) -> Verdict:
    """Lossless speculative verification for a whole batch at once.

    draft_tokens:   [B, G]      proposed tokens (G = the round's largest gamma; may be 0)
    draft_probs:    [B, G, V]   warped draft distributions the proposals were sampled from
                                (None when every row is greedy or none samples by
                                rejection)
    target_logits:  [B, G+1, V] raw target logits at the positions of [last token, drafts...]
    target_probs:   [B, G+1, V] warped target distributions (None when every row is greedy)
    row_gamma:      [B]         drafts this row really proposed (<= G); later ones are ignored
    greedy:         [B] bool    rows decoded greedily
    seeds:          [B]         per-request seeds
    first_position: [B]         absolute position of the first draft token
    coupled_rows:   [C]         sampling rows whose caller set a seed (None: none)
    rejection:      host flag   some sampling row is not coupled (False: skip the rejection
                                path, whose results coupled rows overwrite; draft_probs unused)

    Greedy rows accept the longest prefix equal to the target's argmax and then take the argmax.
    Sampling rows follow Leviathan et al. / Chen et al.: accept draft x with probability
    min(1, p(x)/q(x)); at the first rejection sample from max(p - q, 0). A zero draft row is
    appended at index G and every row's drafts past its own gamma are zeroed, so the "residual"
    at the stopping index is the plain target distribution when all drafts were accepted: the
    bonus token needs no separate path.

    Coupled rows (a seed the caller chose) take at each position the target's own sample under
    noise hashed from (seed, position, token) (``coupled_sample``; their drafts were sampled
    under the same noise) and accept a draft only if it is that token. Their output is then
    the very tokens target-only sampling with that seed gives, whatever was drafted, so it
    repeats under any load; a draft close to the target agrees a little less often than
    rejection sampling would accept it (default pair, per token: 0.61 against 0.63 at T 0.7).
    """
    rows, gamma = draft_tokens.shape
    device = draft_tokens.device
    offsets = torch.arange(gamma + 1, device=device)
    in_range = offsets[None, :gamma] < row_gamma[:, None]  # [B, G]
    target_argmax = target_logits.argmax(-1)  # [B, G+1]
    accept = draft_tokens == target_argmax[:, :gamma]
    positions = first_position[:, None] + offsets[None, :]  # [B, G+1]
    rejection = rejection and target_probs is not None
    if rejection and gamma > 0:
        p_draft_token = target_probs[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_draft_token = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u_accept = uniform(seeds, positions[:, :gamma], ACCEPT_TEST)
        # u < p/q written without the division; q > 0 for a token the draft actually sampled.
        stochastic_accept = u_accept * q_draft_token.double() < p_draft_token.double()
        accept = torch.where(greedy[:, None], accept, stochastic_accept)
    coupled = None
    if coupled_rows is not None and target_probs is not None:
        # The token the target takes at each position: its argmax, or a coupled row's sample.
        target_choice = target_argmax.clone()
        target_choice[coupled_rows] = coupled_sample(
            target_probs[coupled_rows], seeds[coupled_rows], positions[coupled_rows]
        )
        coupled = torch.zeros(rows, dtype=torch.bool, device=device)
        coupled[coupled_rows] = True
        accept = torch.where(coupled[:, None], draft_tokens == target_choice[:, :gamma], accept)
    accept &= in_range
    accepted_len = accept.to(torch.int64).cumprod(-1).sum(-1)  # [B]

    next_token = target_argmax.gather(-1, accepted_len[:, None]).squeeze(-1)
    if rejection:
        index = accepted_len[:, None, None].expand(-1, 1, target_probs.shape[-1])
        p_at = target_probs.gather(1, index).squeeze(1)  # [B, V]
        q_padded = torch.zeros_like(target_probs)
        if gamma:
            q_padded[:, :gamma] = draft_probs * in_range[..., None]
        q_at = q_padded.gather(1, index).squeeze(1)
        residual = residual_distribution(p_at, q_at)
        u_sample = uniform(seeds, first_position + accepted_len, TARGET_SAMPLE)
        sampled = sample_from(residual, u_sample)
        next_token = torch.where(greedy, next_token, sampled)
    if coupled is not None:
        chosen = target_choice.gather(-1, accepted_len[:, None]).squeeze(-1)
        next_token = torch.where(coupled, chosen, next_token)

    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(rows, 1)], dim=1)
    tokens.scatter_(1, accepted_len[:, None], next_token[:, None])
    return Verdict(accepted_len, tokens, accepted_len + 1)
