from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import engine.sampling as sampling_module
import engine.verifier as verifier_module
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.penalties import penalised
from engine.sampling import warp_probs
from engine.verifier import verify
from tests.engine.conftest import perturbed, reference_penalise, tiny_model

VOCAB = 12


def _greedy_inputs(draft: list[list[int]], argmax: list[list[int]], vocab: int = 8):
    rows, gamma = len(draft), len(draft[0])
    logits = torch.zeros(rows, gamma + 1, vocab)
    for b, row in enumerate(argmax):
        for i, token in enumerate(row):
            logits[b, i, token] = 5.0
    return torch.tensor(draft), logits


def test_greedy_accepts_matching_prefix_then_target_token() -> None:
    draft, logits = _greedy_inputs(
        [[1, 2, 3], [1, 2, 3], [4, 4, 4]], [[1, 2, 3, 7], [1, 5, 3, 7], [0, 4, 4, 6]]
    )
    result = verify(
        draft, None, logits, None,
        row_gamma=torch.tensor([3, 3, 3]), greedy=torch.ones(3, dtype=torch.bool),
        seeds=torch.zeros(3, dtype=torch.long), first_position=torch.zeros(3, dtype=torch.long),
    )  # fmt: skip
    assert result.accepted_len.tolist() == [3, 1, 0]
    assert result.tokens[0].tolist() == [1, 2, 3, 7]  # all accepted, then the bonus token
    assert result.tokens[1, :2].tolist() == [1, 5]  # the target's correction at the mismatch
    assert result.tokens[2, 0].item() == 0


def test_rows_never_accept_past_their_own_gamma() -> None:
    draft, logits = _greedy_inputs([[1, 2, 3], [1, 2, 3]], [[1, 2, 3, 7], [1, 2, 3, 7]])
    result = verify(
        draft, None, logits, None,
        row_gamma=torch.tensor([1, 0]), greedy=torch.ones(2, dtype=torch.bool),
        seeds=torch.zeros(2, dtype=torch.long), first_position=torch.zeros(2, dtype=torch.long),
    )  # fmt: skip
    assert result.accepted_len.tolist() == [1, 0]
    assert result.tokens[0, :2].tolist() == [1, 2] and result.tokens[1, 0].item() == 1


def test_identical_distributions_accept_everything() -> None:
    torch.manual_seed(0)
    rows, gamma = 16, 4
    probs = torch.rand(rows, gamma + 1, 8).softmax(-1)
    draft = torch.multinomial(probs[:, :gamma].reshape(-1, 8), 1).view(rows, gamma)
    result = verify(
        draft, probs[:, :gamma], probs.log(), probs,
        row_gamma=torch.full((rows,), gamma), greedy=torch.zeros(rows, dtype=torch.bool),
        seeds=torch.arange(rows), first_position=torch.full((rows,), 5),
    )  # fmt: skip
    assert result.accepted_len.tolist() == [gamma] * rows


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    if (counts[probs == 0] > 0).any():  # a token the law rules out was drawn: no bin takes it
        return math.inf, 1
    total = counts.sum().item()
    expected = probs * total
    big = expected >= 5  # pool rare tokens into one bin so the approximation holds
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2) / exp)[keep].sum().item()
    return stat, int(keep.sum().item()) - 1


def _exact_marginals(target, prompt: list[int], steps: int, params: SamplingParams):
    """Distribution of the token at each of the first ``steps`` positions under the target
    alone, by enumerating every continuation (the vocabulary is tiny)."""
    prefixes, weights = [prompt], torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        with torch.no_grad():
            logits = target(torch.tensor(prefixes)).logits[:, -1:].float()
        if penalised(params):
            for i, prefix in enumerate(prefixes):
                logits[i, 0] = reference_penalise(
                    logits[i, 0], prefix[len(prompt) :], prompt, params.presence_penalty,
                    params.frequency_penalty, params.repetition_penalty, params.logit_bias or {},
                ).float()  # fmt: skip
        if len(prefixes[0]) - len(prompt) < params.min_tokens:
            logits[:, 0, params.stop_token_ids] = float("-inf")
        n = len(prefixes)
        probs = warp_probs(
            logits, torch.full((n,), params.temperature), torch.full((n,), max(params.top_k, 0)),
            torch.full((n,), params.top_p),
            min_p=torch.full((n,), params.min_p) if params.min_p else None,
        )[:, 0].double()  # fmt: skip
        joint = weights[:, None] * probs
        marginals.append(joint.sum(0))
        prefixes = [p + [t] for p in prefixes for t in range(VOCAB)]
        weights = joint.reshape(-1)
    return marginals


def _speculative_counts(
    target,
    draft,
    prompt,
    steps: int,
    params: SamplingParams,
    path: str,
    draft_vocab: int = 0,
    prompt_lookup: int = 0,
    samples: int = 4000,
):
    """Token counts per position over ``samples`` seeds. ``path``: "rejection" (the seeds
    reach the engine beside the parameters, as the server passes an unseeded request's) or
    "coupled" (the caller's own seeds, in the parameters)."""
    config = EngineConfig(
        gamma=3, max_slots=64, max_len=32, draft_vocab=draft_vocab, prompt_lookup=prompt_lookup
    )
    eng = Engine(target, draft, config)
    if path == "coupled":
        rows = [replace(params, seed=seed) for seed in range(samples)]
        results = eng.generate([prompt] * samples, rows)
    else:
        results = eng.generate([prompt] * samples, params, seeds=list(range(samples)))
    counts = torch.zeros(steps, VOCAB, dtype=torch.float64)
    for r in results:
        for position, token in enumerate(r.token_ids[:steps]):
            counts[position, token] += 1
    return counts, eng.stats.acceptance_rate


SAMPLING_CASES = [
    ({"temperature": 1.0}, 0),
    ({"temperature": 0.7, "top_k": 6}, 0),
    ({"temperature": 1.3, "top_p": 0.8}, 0),
    ({"temperature": 1.0, "min_p": 0.4}, 0),
    # A draft head over half the vocabulary: q is 0 elsewhere, the target still decides.
    ({"temperature": 1.0}, 6),
    # Penalised: each position's target distribution depends on the drafts before it.
    # min_tokens covers every counted position, so the stop id never ends a sample early.
    (
        {
            "temperature": 1.0,
            "presence_penalty": 1.2,
            "frequency_penalty": 0.6,
            "repetition_penalty": 1.5,
            "logit_bias": {4: 1.5},
            "min_tokens": 4,
            "stop_token_ids": [6],
        },
        0,
    ),  # fmt: skip
]


def _tempered(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A coupled sampler gone wrong: the right noise, but on p squared."""
    return sampling_module.coupled_sample(probs.square(), seeds, positions)


@pytest.mark.parametrize("path", ["rejection", "coupled"])
@pytest.mark.parametrize(
    "case,draft_vocab",
    SAMPLING_CASES,
    ids=["t1", "t0.7-topk6", "t1.3-topp0.8", "t1-minp0.4", "t1-draftvocab6", "t1-penalties"],
)
def test_sampled_tokens_follow_the_target_distribution(
    case: dict, draft_vocab: int, path: str, monkeypatch
) -> None:
    target = tiny_model("llama", seed=3, vocab=VOCAB, sharpen=2.0)
    draft = tiny_model("llama", seed=4, vocab=VOCAB, sharpen=2.0, layers=1)
    # Four positions: a row's first round samples its first token from the target alone, the
    # second drafts for the other three.
    prompt, steps = [3, 5, 7], 4
    params = SamplingParams(max_tokens=steps, ignore_eos=True, **case)
    marginals = _exact_marginals(target, prompt, steps, params)
    counts, acceptance = _speculative_counts(
        target, draft, prompt, steps, params, path, draft_vocab
    )
    assert 0.1 < acceptance < 0.9  # the draft really disagrees: the residual path is exercised
    for position in range(steps):
        stat, df = _chi_square(counts[position], marginals[position])
        assert stat < _chi_square_critical(df), (position, stat, df)
    if penalised(params):
        # And it would catch an engine that ignored them: the unpenalised law is far off.
        plain = _exact_marginals(target, prompt, steps, SamplingParams(temperature=1.0))
        worst = max(
            _chi_square(counts[pos], plain[pos])[0] / _chi_square_critical(df)
            for pos in range(steps)
        )
        assert worst > 3.0

    # The same check must catch a sampler that resamples from the target instead of the
    # residual on rejection (that over-weights tokens the draft likes), or a coupled one that
    # takes its noise on the wrong law.
    if path == "rejection":
        monkeypatch.setattr(verifier_module, "residual_distribution", lambda p, q: p)
    else:
        monkeypatch.setattr(verifier_module, "coupled_sample", _tempered)
    wrong, _ = _speculative_counts(target, draft, prompt, steps, params, path, draft_vocab)
    worst = max(
        _chi_square(wrong[pos], marginals[pos])[0] / _chi_square_critical(df)
        for pos in range(steps)
    )
    assert worst > 3.0


@pytest.mark.parametrize("with_draft", [False, True], ids=["lookup-only", "lookup-and-draft"])
def test_prompt_lookup_sampling_follows_the_target_distribution(
    with_draft: bool, monkeypatch
) -> None:
    """Copied drafts are point masses (q = 1): the same rejection rule keeps sampling exact."""
    target = tiny_model("llama", seed=3, vocab=VOCAB, sharpen=2.0)
    draft = tiny_model("llama", seed=4, vocab=VOCAB, sharpen=2.0, layers=1) if with_draft else None
    # Repeating n-grams, so the lookup proposes from the first round on.
    prompt, steps = [7, 3, 5, 1, 7, 3, 5], 3
    params = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=1.0)
    marginals = _exact_marginals(target, prompt, steps, params)
    eng_counts = _speculative_counts(
        target, draft, prompt, steps, params, "rejection", prompt_lookup=3
    )
    counts, acceptance = eng_counts
    assert 0.05 < acceptance < 0.95
    for position in range(steps):
        stat, df = _chi_square(counts[position], marginals[position])
        assert stat < _chi_square_critical(df), (position, stat, df)

    monkeypatch.setattr(verifier_module, "residual_distribution", lambda p, q: p)
    wrong, _ = _speculative_counts(
        target, draft, prompt, steps, params, "rejection", prompt_lookup=3
    )
    worst = max(
        _chi_square(wrong[pos], marginals[pos])[0] / _chi_square_critical(df)
        for pos in range(steps)
    )
    assert worst > 3.0


def test_same_seed_same_output_regardless_of_batch() -> None:
    target = tiny_model("qwen2", seed=3, sharpen=2.0)
    draft = tiny_model("qwen2", seed=4, sharpen=2.0, layers=1)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    eng = Engine(target, draft, EngineConfig(gamma=3, max_slots=4, max_len=64))
    alone = eng.generate([[5, 6, 7]], params)[0].token_ids
    other = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    batched = eng.generate([[9, 9], [5, 6, 7], [1, 2, 3, 4]], [other, params, other])
    assert batched[1].token_ids == alone
    unseeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    runs = {tuple(r.token_ids) for r in eng.generate([[5, 6, 7]] * 4, unseeded)}
    assert len(runs) > 1


SEEDED_CASES = {
    "t1": {"temperature": 1.0},
    "t0.8-topp0.9": {"temperature": 0.8, "top_p": 0.9},
    "t1-penalties": {"temperature": 1.0, "presence_penalty": 0.8, "repetition_penalty": 1.3},
}


@pytest.mark.parametrize("case", list(SEEDED_CASES))
@pytest.mark.parametrize("draft_kind", ["same", "perturbed", "unrelated", "lookup"])
def test_a_seeded_request_samples_what_target_only_sampling_does(
    draft_kind: str, case: str
) -> None:
    target = tiny_model("qwen2", seed=3, sharpen=2.0)
    draft = {
        "same": target,
        "perturbed": perturbed(target, 0.3),
        "unrelated": tiny_model("qwen2", seed=4, sharpen=2.0, layers=1),
        "lookup": None,
    }[draft_kind]
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 9], list(range(20, 41))]
    params = [
        SamplingParams(max_tokens=24, ignore_eos=True, seed=seed, **SEEDED_CASES[case])
        for seed in (11, 12, 13)
    ]
    plain = Engine(target, None, EngineConfig(gamma=0, max_slots=4, max_len=64))
    expected = [r.token_ids for r in plain.generate(prompts, params)]
    speculative = Engine(
        target, draft, EngineConfig(gamma=4, max_slots=4, max_len=64, prompt_lookup=3)
    )
    # Together, then one at a time: other rows and other drafts change nothing.
    assert [r.token_ids for r in speculative.generate(prompts, params)] == expected
    for prompt, row_params, want in zip(prompts, params, expected, strict=True):
        assert speculative.generate([prompt], row_params)[0].token_ids == want
    stats = speculative.stats
    assert stats.drafted > 0
    if draft_kind == "same":
        # The same law under the same noise: every model draft agrees (copies may not).
        assert stats.rejections == stats.ngram_rejections
    elif draft_kind != "lookup":
        assert 0 < stats.accepted < stats.drafted


def test_without_unseeded_rows_the_rejection_path_is_skipped_with_the_same_verdict() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, gamma = 6, 3
    target_probs = torch.rand(rows, gamma + 1, VOCAB, generator=generator).pow(4).softmax(-1)
    draft_probs = torch.rand(rows, gamma, VOCAB, generator=generator).pow(4).softmax(-1)
    # Drafts of the target's own likeliest tokens, so that some are accepted.
    draft = target_probs[:, :gamma].argmax(-1)
    draft[::2, 1] = (draft[::2, 1] + 1) % VOCAB
    greedy = torch.tensor([True, False, False, True, False, False])
    coupled = torch.tensor([1, 2, 4, 5])  # every sampling row has a seed
    arguments = dict(
        target_logits=target_probs.log(), target_probs=target_probs,
        row_gamma=torch.tensor([3, 3, 2, 1, 3, 0]), greedy=greedy,
        seeds=torch.arange(rows) + 40, first_position=torch.arange(rows) + 7,
        coupled_rows=coupled,
    )  # fmt: skip
    full = verify(draft, draft_probs, **arguments)
    skipped = verify(draft, None, rejection=False, **arguments)
    assert torch.equal(full.accepted_len, skipped.accepted_len)
    assert torch.equal(full.tokens, skipped.tokens)
    assert 0 < full.accepted_len.sum() < rows * gamma


def test_a_seeded_request_beside_unseeded_and_greedy_ones_still_samples_target_only() -> None:
    target = tiny_model("qwen2", seed=3, sharpen=2.0)
    draft = perturbed(target, 0.3)
    prompts = [[5, 6, 7], [9, 9, 4], [1, 2, 3, 4]]
    params = [
        SamplingParams(max_tokens=20, temperature=0.9, seed=21, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    ]
    plain = Engine(target, None, EngineConfig(gamma=0, max_slots=4, max_len=64))
    expected = [r.token_ids for r in plain.generate(prompts, params)]
    speculative = Engine(target, draft, EngineConfig(gamma=4, max_slots=4, max_len=64))
    got = [r.token_ids for r in speculative.generate(prompts, params)]
    assert got[0] == expected[0] and got[2] == expected[2]
    assert len(got[1]) == 20
    assert 0 < speculative.stats.accepted < speculative.stats.drafted
