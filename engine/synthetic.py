"""A draft/target pair of the real shapes whose greedy agreement is a dial.

The real weights cannot travel to a lent GPU (the device tool carries 64 MiB; the target alone
is 3 GB), and speed depends on shapes, not values: random weights of the real Qwen2 shapes cost
what the real pair costs per forward. But two random models agree on nothing, so speculation
would never pay and a benchmark would only time its overhead. Here each model's greedy next
token is a fixed function of its input token, a permutation built into the embedding and the LM
head, and the draft's permutation equals the target's on a chosen share of the vocabulary: the
acceptance rate becomes a setting while every matrix product keeps its real size.

Why it works: the embeddings have norm ~sqrt(hidden) and the layers' output projections are
scaled down, so the final hidden state is the input token's normalised embedding plus a little
noise; LM head row ``successor[x]`` is embedding ``x`` (scaled), so the largest logit is
``successor[x]`` by a margin of ~``logit_scale`` against ~N(0, logit_scale / sqrt(hidden)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config

# Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct as the GGUF conversion configures them
# (both heads untied there: the draft's head is its own 152k-row matrix).
QWEN25_VOCAB = 151936
REAL_SHAPES: dict[str, dict[str, int]] = {
    "target": {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": QWEN25_VOCAB,
    },
    "draft": {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": QWEN25_VOCAB,
    },
}  # fmt: skip
# Seconds on any CPU: for tests and for trying the benchmark out.
TINY_SHAPES: dict[str, dict[str, int]] = {
    "target": {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    },
    "draft": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    },
}  # fmt: skip
SHAPES = {"real": REAL_SHAPES, "tiny": TINY_SHAPES}

# Output projections, scaled by LAYER_SCALE: their sum over the layers stays a few percent of
# the embedding in the residual stream, so it cannot move the argmax.
OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight")
LAYER_SCALE = 0.01
LOGIT_SCALE = 20.0


@dataclass
class SyntheticPair:
    target: PreTrainedModel
    draft: PreTrainedModel
    successor: torch.Tensor  # [V] the target's greedy next token after each token
    draft_successor: torch.Tensor  # [V] the draft's; equal to successor on `agreement` of them

    def continuation(self, last_token: int, length: int) -> list[int]:
        """The target's greedy continuation after ``last_token``."""
        tokens, token = [], last_token
        for _ in range(length):
            token = int(self.successor[token])
            tokens.append(token)
        return tokens


def qwen2_config(shape: dict[str, int], max_len: int) -> Qwen2Config:
    # No end-of-sequence token: every request runs to its max_tokens, as a benchmark wants.
    return Qwen2Config(
        **shape,
        max_position_embeddings=max(max_len, 512),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def successor_model(
    config: Qwen2Config,
    successor: torch.Tensor,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> PreTrainedModel:
    """A random model of ``config``'s shape whose greedy next token after x is successor[x]."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hidden = config.hidden_size
    embedding = torch.randn((config.vocab_size, hidden), generator=generator)
    head = torch.empty_like(embedding)
    head[successor] = embedding * (LOGIT_SCALE / hidden)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embedding)
        model.get_output_embeddings().weight.copy_(head)
        for name, param in model.named_parameters():
            if name.endswith(OUTPUT_PROJECTIONS):
                param.mul_(LAYER_SCALE)
    return model.eval().requires_grad_(False)


def draft_successor(
    successor: torch.Tensor, agreement: float, generator: torch.Generator
) -> torch.Tensor:
    """A permutation equal to ``successor`` on a random ``agreement`` share of the tokens and
    different on every other one (the disagreeing tokens' images are rotated among them)."""
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must be in [0, 1], got {agreement}")
    vocab = successor.numel()
    order = torch.randperm(vocab, generator=generator)
    disagree = order[: round(vocab * (1.0 - agreement))]
    result = successor.clone()
    if disagree.numel() >= 2:
        result[disagree] = successor[disagree.roll(1)]
    elif disagree.numel() == 1:
        # One token cannot be rotated alone: swap it with an agreeing one (both then differ).
        other = order[1]
        result[disagree[0]], result[other] = successor[other], successor[disagree[0]]
    return result


def synthetic_pair(
    shapes: str = "real",
    agreement: float = 0.85,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    max_len: int = 4096,
    seed: int = 0,
) -> SyntheticPair:
    """A target and a draft of ``SHAPES[shapes]`` whose greedy tokens agree on ``agreement``
    of the vocabulary (so about that share of drafted tokens is accepted)."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    target_shape, draft_shape = SHAPES[shapes]["target"], SHAPES[shapes]["draft"]
    vocab = target_shape["vocab_size"]
    successor = torch.randperm(vocab, generator=generator)
    guess = draft_successor(successor, agreement, generator)
    target_config = qwen2_config(target_shape, max_len)
    draft_config = qwen2_config(draft_shape, max_len)
    target = successor_model(target_config, successor, generator, dtype, device)
    draft = successor_model(draft_config, guess, generator, dtype, device)
    return SyntheticPair(target, draft, successor, guess)


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of ``length`` uniformly random token ids (no n-gram repeats to speak
    of, so prompt lookup finds nothing and the draft model does the proposing)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (count, length), generator=generator).tolist()
