from __future__ import annotations

import pytest
import torch

import engine.sampling as sampling_module
from engine import cpu_linear
from engine.sampling import (
    ACCEPT_TEST,
    DRAFT_SAMPLE,
    _splitmix64,
    coupled_sample,
    race_uniforms,
    sample_from,
    uniform,
    warp_probs,
)


def test_uniform_is_a_pure_function_of_seed_position_and_purpose() -> None:
    seeds = torch.tensor([1, 2, 3])
    positions = torch.tensor([[10, 11], [10, 11], [10, 11]])
    first = uniform(seeds, positions, DRAFT_SAMPLE)
    assert torch.equal(first, uniform(seeds, positions, DRAFT_SAMPLE))
    # Row 1 alone gives the same numbers as inside the batch: batch-independence.
    assert torch.equal(first[1], uniform(seeds[1:2], positions[1:2], DRAFT_SAMPLE)[0])
    assert not torch.equal(first, uniform(seeds, positions, ACCEPT_TEST))
    assert len(set(first.flatten().tolist())) == 6


def test_uniform_is_uniform() -> None:
    values = uniform(torch.tensor([7]), torch.arange(200_000)[None], DRAFT_SAMPLE).flatten()
    assert values.dtype == torch.float64
    assert values.min().item() >= 0.0 and values.max().item() < 1.0
    histogram = torch.histc(values.float(), bins=20, min=0, max=1)
    assert (histogram - 10_000).abs().max().item() < 600  # ~6 sigma
    assert abs(values[:-1].sub(0.5).mul(values[1:].sub(0.5)).mean().item()) < 0.002


def _reference_warp(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
):
    probs = (logits / temperature).softmax(-1)
    if min_p:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    order = probs.argsort(descending=True).tolist()
    keep: list[int] = []
    mass = 0.0
    for rank, token in enumerate(order):
        if top_k and rank >= top_k:
            break
        if mass >= top_p:
            break
        keep.append(token)
        mass += probs[token].item() / probs[order[: top_k or len(order)]].sum().item()
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.5, 3, 1.0, 0.0),
        (1.5, 0, 0.7, 0.0),
        (0.8, 5, 0.5, 0.0),
        (1.0, 0, 1.0, 0.2),
        (0.8, 5, 0.9, 0.3),
        (1.3, 0, 0.8, 0.25),
    ],  # fmt: skip
)
def test_warp_matches_a_plain_reference(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 16) * 2
    rows = logits.shape[0]
    warped = warp_probs(
        logits,
        torch.full((rows,), temperature),
        torch.full((rows,), top_k),
        torch.full((rows,), top_p),
        min_p=torch.full((rows,), min_p) if min_p else None,
    )
    if min_p:  # it really drops tokens the other settings keep
        without = torch.stack([_reference_warp(x, temperature, top_k, top_p) for x in logits[:, 0]])
        assert (warped[:, 0] == 0).sum() > (without == 0).sum()
    for b in range(rows):
        for k in range(2):
            expected = _reference_warp(logits[b, k], temperature, top_k, top_p, min_p)
            torch.testing.assert_close(warped[b, k], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sharpness", [4.0, 0.2])  # a nucleus within the head, one past it
def test_truncation_ranks_a_head_of_the_vocabulary_and_falls_back_to_a_sort(
    monkeypatch: pytest.MonkeyPatch, sharpness: float
) -> None:
    monkeypatch.setattr(sampling_module, "RANKED_HEAD", 32)
    heads: list[tuple[int, int]] = []  # (head, rows) per call
    floor = sampling_module._truncation_floor

    def spy(*args):
        result = floor(*args)
        heads.append((args[-1], len(args[0])))
        return result

    monkeypatch.setattr(sampling_module, "_truncation_floor", spy)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 2000, generator=generator) * sharpness
    settings = [(0.9, 0, 0.8), (1.0, 20, 1.0), (0.7, 50, 0.9)]  # temperature, top_k, top_p
    warped = warp_probs(
        logits,
        torch.tensor([t for t, _, _ in settings]),
        torch.tensor([k for _, k, _ in settings]),
        torch.tensor([p for _, _, p in settings]),
    )
    for b, (temperature, top_k, top_p) in enumerate(settings):
        for k in range(2):
            expected = _reference_warp(logits[b, k], temperature, top_k, top_p)
            torch.testing.assert_close(warped[b, k], expected, atol=1e-6, rtol=1e-5)
    # A head of 50 (the largest top-k) ranked all six rows; where it held a top-p row's nucleus
    # nothing more ran, else that row alone was sorted whole (top-k rows need no more).
    assert heads[0] == (50, 6)
    assert heads[1:] == ([] if sharpness > 1 else [(2000, 2)])


def test_tokens_tied_at_the_truncation_edge_stay_or_go_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logits = torch.tensor([[[5.0, 3.0, 4.0, 3.0, 1.0, 3.0]]])
    one = torch.ones(1)
    kept = warp_probs(logits, one, torch.tensor([3]), one)[0, 0] > 0
    assert kept.tolist() == [True, True, True, True, False, True]  # 3rd largest is a tie
    probs = logits.softmax(-1)[0, 0]
    # The cut falls inside the tied group: the mass above it (5.0 and 4.0) is below top_p.
    top_p = (probs[0] + probs[2] + probs[1] / 2).item()
    nucleus = warp_probs(logits, one, torch.zeros(1, dtype=torch.long), torch.tensor([top_p]))
    assert (nucleus[0, 0] > 0).tolist() == [True, True, True, True, False, True]
    # The same with a ranked head that ends inside the tie: ties past the head count too.
    monkeypatch.setattr(sampling_module, "RANKED_HEAD", 3)
    wide = torch.cat([logits, torch.full((1, 1, 2000), -20.0)], dim=-1)
    headed = warp_probs(wide, one, torch.zeros(1, dtype=torch.long), torch.tensor([top_p]))
    torch.testing.assert_close(headed[0, 0, :6], nucleus[0, 0], atol=1e-6, rtol=1e-5)


def test_warp_applies_settings_per_row() -> None:
    logits = torch.randn(2, 1, 10)
    warped = warp_probs(
        logits, torch.tensor([1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([1.0, 1.0])
    )
    assert (warped[0, 0] > 0).sum().item() == 2
    assert (warped[1, 0] > 0).sum().item() == 10


def test_row_sampling_reads_its_warping_steps_from_the_host() -> None:
    # The engine tells warp_probs from host values which truncations any row wants (no wait for
    # the device); the result is what reading them from the tensors gives, for the whole
    # batch and for the subset of rows a draft pass takes.
    from engine.config import SamplingParams
    from engine.proposer import RowSampling

    params = [
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=3),
        SamplingParams(temperature=1.0, top_k=100, min_p=0.1),  # top-k past the vocabulary
    ]
    sampling = RowSampling.build(params, [11, 12, 13, 14], torch.device("cpu"))
    assert sampling.host_top_k == [0, 0, 3, 100] and sampling.host_top_p == [0.8, 1, 1, 1]
    logits = torch.randn(4, 2, 16) * 2
    assert sampling.min_p is not None and sampling.min_p.tolist() == pytest.approx([0, 0, 0, 0.1])
    expected = warp_probs(
        logits, sampling.temperature, sampling.top_k, sampling.top_p, min_p=sampling.min_p
    )
    torch.testing.assert_close(sampling.warp(logits), expected, atol=0, rtol=0)
    for rows in ([1, 3], [2], [0, 2]):
        subset = sampling.select(rows, torch.tensor(rows))
        assert subset.host_top_k == [sampling.host_top_k[i] for i in rows]
        assert torch.equal(subset.seeds, torch.tensor([11, 12, 13, 14])[rows])
        plain = warp_probs(
            logits[rows], subset.temperature, subset.top_k, subset.top_p, min_p=subset.min_p
        )
        torch.testing.assert_close(subset.warp(logits[rows]), plain, atol=0, rtol=0)


def test_sample_from_follows_the_distribution_and_skips_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25])
    u = uniform(torch.tensor([3]), torch.arange(40_000)[None], DRAFT_SAMPLE)[0]
    tokens = sample_from(probs.expand(40_000, 5), u)
    counts = torch.bincount(tokens, minlength=5).double() / 40_000
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts, probs.double(), atol=0.01, rtol=0)
    # Unnormalised input samples the same as normalised.
    assert torch.equal(sample_from(probs.expand(40_000, 5) * 3, u), tokens)


@pytest.fixture(params=["kernel", "torch"])
def race_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The race's noise from the C kernel (where it loads) and from torch's ops."""
    if request.param == "kernel":
        if not cpu_linear.available():
            pytest.skip("the CPU kernels do not load here")
    else:
        monkeypatch.setattr(cpu_linear, "race_noise", lambda keys, ids, n: None)
    return request.param


def test_race_uniforms_are_never_0_or_1() -> None:
    # The extreme 64-bit patterns: all ones (whose top 24 bits once rounded to exactly 1.0,
    # a zero noise that won every race), all zeros, the sign bit alone, and the rest.
    bits = torch.tensor([-1, 0, -(2**63), 2**63 - 1, 2**40, -(2**41)], dtype=torch.int64)
    u = race_uniforms(bits)
    assert u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert u[0] == 1 - 2**-24 and u[1] == 2**-24
    assert bool(torch.isfinite(u.log()).all())


def test_a_token_of_negligible_probability_is_never_raced_in(race_path: str) -> None:
    """Over the real vocabulary, 400 positions of a distribution on one token (the rest
    1e-12 each: 1.5e-7 in all) give that token every time."""
    vocab = 151_936
    probs = torch.full((400, vocab), 1e-12)
    probs[:, 0] = 1.0
    seeds = torch.tensor([7])
    tokens = coupled_sample(probs, seeds, torch.arange(400)[None])
    assert tokens.shape == (1, 400)
    assert int((tokens != 0).sum()) == 0


def test_the_kernels_noise_is_torchs_and_the_same_wherever_an_id_lies() -> None:
    if not cpu_linear.available():
        pytest.skip("the CPU kernels do not load here")
    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(-(2**62), 2**62, (3, 5), generator=generator)
    n = 1003  # not a multiple of 8: the last ids go through the padded vector
    kernel = cpu_linear.race_noise(keys, None, n)
    assert kernel is not None and kernel.shape == (3, 5, n)
    ids = torch.arange(n)
    expected = race_uniforms(_splitmix64(keys[..., None] ^ ids)).log_().neg_()
    torch.testing.assert_close(kernel, expected, rtol=4e-7, atol=0)
    assert bool((kernel > 0).all())
    # Bit for bit: a row alone as in the batch, ids in any order, a subset of ids.
    alone = cpu_linear.race_noise(keys[1, 2:3], None, n)
    assert alone is not None and torch.equal(alone[0], kernel[1, 2])
    chosen = torch.randperm(n, generator=generator)[:77]
    subset = cpu_linear.race_noise(keys, chosen, len(chosen))
    assert subset is not None and torch.equal(subset, kernel[..., chosen])


def test_a_race_over_the_support_is_the_race_over_the_vocabulary(race_path: str) -> None:
    generator = torch.Generator().manual_seed(1)
    vocab, rows = 5000, 64
    support = torch.randperm(vocab, generator=generator)[:700]
    probs = torch.zeros(rows, vocab)
    probs[:, support] = torch.rand(rows, len(support), generator=generator) ** 4
    seeds = torch.arange(rows)
    positions = torch.full((rows,), 9)
    whole = coupled_sample(probs, seeds, positions)
    restricted = coupled_sample(probs[:, support], seeds, positions, support)
    assert torch.equal(restricted, whole)
    assert bool(torch.isin(whole, support).all())
