from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.synthetic import (
    REAL_SHAPES,
    TINY_SHAPES,
    draft_successor,
    random_prompts,
    synthetic_pair,
)

VOCAB = TINY_SHAPES["target"]["vocab_size"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_model_greedily_follows_its_permutation(dtype: torch.dtype) -> None:
    pair = synthetic_pair("tiny", agreement=0.5, dtype=dtype, seed=3)
    prompts = torch.tensor(random_prompts(3, 50, VOCAB, seed=4))
    with torch.inference_mode():
        target_next = pair.target(prompts).logits.argmax(-1)
        draft_next = pair.draft(prompts).logits.argmax(-1)
    # Every position, whatever came before it: the layers' attention cannot move the argmax.
    assert torch.equal(target_next, pair.successor[prompts])
    assert torch.equal(draft_next, pair.draft_successor[prompts])
    assert not torch.equal(draft_next, target_next)


@pytest.mark.parametrize("agreement", [0.0, 0.3, 0.85, 1.0])
def test_draft_successor_agrees_on_the_asked_share(agreement: float) -> None:
    successor = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    guess = draft_successor(successor, agreement, torch.Generator().manual_seed(1))
    assert torch.equal(guess.sort().values, torch.arange(1000))  # still a permutation
    assert int((guess == successor).sum()) == 1000 - round(1000 * (1 - agreement))


def test_a_single_disagreement_still_differs() -> None:
    # 1 - 0.999 of 1000 tokens is one token: a rotation of one is no change, so it swaps.
    successor = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    guess = draft_successor(successor, 0.999, torch.Generator().manual_seed(1))
    assert torch.equal(guess.sort().values, torch.arange(1000))
    assert 1 <= int((guess != successor).sum()) <= 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="agreement"):
        draft_successor(torch.arange(10), 1.5, torch.Generator())
    with pytest.raises(ValueError, match="shapes"):
        synthetic_pair("huge")


def test_real_shapes_are_the_qwen25_coder_pair() -> None:
    # The GGUF conversion's configs: 1.5B target, 0.5B draft, one vocabulary.
    assert REAL_SHAPES["target"]["hidden_size"] == 1536
    assert REAL_SHAPES["target"]["num_hidden_layers"] == 28
    assert REAL_SHAPES["draft"]["hidden_size"] == 896
    assert REAL_SHAPES["draft"]["num_hidden_layers"] == 24
    assert REAL_SHAPES["target"]["vocab_size"] == REAL_SHAPES["draft"]["vocab_size"] == 151936


def simulated_acceptance(
    successor: torch.Tensor, guess: torch.Tensor, last: int, max_tokens: int, gamma: int
) -> tuple[int, int]:
    """(drafted, accepted) of greedy speculation with a fixed gamma, worked out by hand: the
    draft chains its own permutation, the target keeps the prefix that matches its own."""
    drafted = accepted = produced = 0
    while produced < max_tokens:
        steps = min(gamma, max_tokens - produced - 1)
        token, run = last, 0
        proposal = last
        for _ in range(steps):
            proposal, token = int(guess[proposal]), int(successor[token])
            if proposal != token:
                break
            run += 1
        drafted += steps
        accepted += run
        for _ in range(run + 1):
            last = int(successor[last])
        produced += run + 1
    return drafted, accepted


@pytest.mark.parametrize("agreement", [0.0, 0.6, 1.0])
def test_speculation_accepts_what_the_dial_says(agreement: float) -> None:
    pair = synthetic_pair("tiny", agreement=agreement, dtype=torch.float32, seed=5)
    prompts = random_prompts(3, 20, VOCAB, seed=6)
    config = EngineConfig(gamma=4, max_slots=3, max_len=128, prefix_cache=False)
    params = SamplingParams(max_tokens=40, temperature=0)
    target_only = Engine(pair.target, None, EngineConfig(gamma=0, max_slots=3, max_len=128))
    expected = [c.token_ids for c in target_only.generate(prompts, params)]
    engine = Engine(pair.target, pair.draft, config)
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == expected == [pair.continuation(p[-1], 40) for p in prompts]
    drafted = accepted = 0
    for prompt in prompts:
        d, a = simulated_acceptance(pair.successor, pair.draft_successor, prompt[-1], 40, 4)
        drafted += d
        accepted += a
    if agreement == 1.0:
        assert engine.stats.accepted == engine.stats.drafted > 0
    if agreement == 0.0:
        assert engine.stats.accepted == 0 < engine.stats.drafted
    # The engine may trim its last round's gamma differently; every other round is exact.
    assert abs(engine.stats.accepted - accepted) <= 3 * 4
    assert abs(engine.stats.drafted - drafted) <= 3 * 4
