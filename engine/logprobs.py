from __future__ import annotations

import torch

from engine.device import to_device
from engine.request import TokenLogprob

_PROMPT_CHUNK = 256  # positions per LM-head call: bounds the [chunk, vocab] logits in memory


def _collect(logprobs: torch.Tensor, chosen: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """logprobs [N, V] log-softmax rows, chosen [N] token ids."""
    chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    top_values, top_ids = (
        logprobs.topk(top_n, dim=-1) if top_n > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    )
    result = []
    for token, value, ids, values in zip(
        chosen.tolist(), chosen_lp, top_ids.tolist(), top_values.tolist(), strict=True
    ):
        top = dict(zip(ids, values, strict=True))
        result.append(TokenLogprob(token_id=token, logprob=value, top=top))
    return result


def token_logprobs(
    target_logits: torch.Tensor, tokens: torch.Tensor, top_ns: list[int | None]
) -> list[list[TokenLogprob] | None]:
    """Target log-probabilities of the round's tokens for rows that asked for them.

    target_logits: [B, G+1, V] raw logits; tokens: [B, G+1] the round's candidate tokens.
    The caller trims each row to the tokens it actually emitted.
    """
    result: list[list[TokenLogprob] | None] = []
    for row, top_n in enumerate(top_ns):
        if top_n is None:
            result.append(None)
            continue
        logprobs = target_logits[row].float().log_softmax(-1)
        result.append(_collect(logprobs, tokens[row], top_n))
    return result


@torch.inference_mode()
def prompt_logprobs(
    lm_head: torch.nn.Module, hidden: torch.Tensor, prompt: list[int], top_n: int
) -> list[TokenLogprob | None]:
    """Logprobs of prompt tokens 2..n from the prefill's hidden states [n-1, H]; the first
    prompt token has no context, hence None (OpenAI's convention)."""
    result: list[TokenLogprob | None] = [None]
    targets = to_device(prompt[1:], hidden.device)
    for start in range(0, hidden.shape[0], _PROMPT_CHUNK):
        logits = lm_head(hidden[start : start + _PROMPT_CHUNK]).float()
        result += _collect(logits.log_softmax(-1), targets[start : start + _PROMPT_CHUNK], top_n)
    return result
