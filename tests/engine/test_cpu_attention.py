from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import cpu_attention
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from tests.engine.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(),
    reason="CPU kernels unavailable (needs x86-64 AVX2+FMA and gcc, "
    "and SPECSERVE_CPU_KERNELS not set to 0)",
)

MASKED = torch.finfo(torch.bfloat16).min


def _inputs(batch: int, heads: int, kv_heads: int, queries: int, keys: int, dim: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Queries come out of a [B, T, H, D] projection transposed, as in the models.
    query = torch.randn(batch, queries, heads, dim, generator=g).bfloat16().transpose(1, 2)
    key = torch.randn(batch, kv_heads, keys, dim, generator=g).bfloat16()
    value = torch.randn(batch, kv_heads, keys, dim, generator=g).bfloat16()
    return query, key, value


def _causal_mask(batch: int, queries: int, keys: int, lengths: list[int]) -> torch.Tensor:
    """Row b's queries sit at the end of its first lengths[b] keys; keys beyond are padding."""
    mask = torch.zeros(batch, 1, queries, keys, dtype=torch.bfloat16)
    for b, length in enumerate(lengths):
        for t in range(queries):
            mask[b, :, t, length - queries + t + 1 :] = MASKED
    return mask


@pytest.mark.parametrize(
    "batch,heads,kv_heads,queries,keys,dim",
    [
        (1, 12, 2, 1, 300, 128),
        (2, 12, 2, 5, 64, 128),
        (3, 4, 4, 7, 33, 64),
        (1, 14, 2, 3, 9, 8),
        (2, 14, 2, 7, 50, 64),
        (1, 6, 1, 9, 40, 24),  # more queries than one work item holds; d not 32-wide steps
    ],
)
def test_matches_fp32_reference(batch, heads, kv_heads, queries, keys, dim, isa) -> None:
    query, key, value = _inputs(batch, heads, kv_heads, queries, keys, dim)
    lengths = [keys - 3 * b for b in range(batch)]
    mask = _causal_mask(batch, queries, keys, lengths)
    got, weights = cpu_attention.attention_forward(None, query, key, value, mask, scaling=0.1)
    assert weights is None
    assert got.shape == (batch, queries, heads, dim) and got.dtype == torch.bfloat16
    want = cpu_attention.reference(query, key, value, mask, 0.1)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_each_query_is_batch_invariant(isa) -> None:
    """A query's output is bit-identical alone, with the other queries, and beside other rows."""
    query, key, value = _inputs(3, 8, 2, 6, 40, 64, seed=1)
    mask = _causal_mask(3, 6, 40, [40, 31, 20])
    together, _ = cpu_attention.attention_forward(None, query, key, value, mask, scaling=0.125)
    for b in range(3):
        for t in range(6):
            alone, _ = cpu_attention.attention_forward(
                None,
                query[b : b + 1, :, t : t + 1],
                key[b : b + 1],
                value[b : b + 1],
                mask[b : b + 1, :, t : t + 1],
                scaling=0.125,
            )
            assert torch.equal(alone[0, 0], together[b, t])


def test_thread_count_does_not_change_bits(isa) -> None:
    query, key, value = _inputs(2, 8, 2, 4, 50, 64, seed=2)
    mask = _causal_mask(2, 4, 50, [50, 44])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = cpu_attention.attention_forward(None, query, key, value, mask, scaling=0.2)
        torch.set_num_threads(2)
        two, _ = cpu_attention.attention_forward(None, query, key, value, mask, scaling=0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_masked_keys_have_no_influence() -> None:
    query, key, value = _inputs(1, 4, 2, 2, 30, 16, seed=3)
    mask = _causal_mask(1, 2, 30, [20])
    before, _ = cpu_attention.attention_forward(None, query, key, value, mask, scaling=0.25)
    key[:, :, 20:] = 1000.0
    value[:, :, 20:] = float("nan")
    after, _ = cpu_attention.attention_forward(None, query, key, value, mask, scaling=0.25)
    assert torch.equal(before, after)


def test_other_inputs_fall_back_to_sdpa() -> None:
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    query, key, value = _inputs(1, 4, 2, 3, 10, 12)  # head dim not a multiple of 8
    mask = _causal_mask(1, 3, 10, [10])
    got, _ = cpu_attention.attention_forward(module, query, key, value, mask, scaling=0.3)
    want = cpu_attention.reference(query, key, value, mask, 0.3)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    query, key, value = (t.float() for t in _inputs(1, 4, 2, 3, 10, 16))
    got, _ = cpu_attention.attention_forward(module, query, key, value, mask.float(), scaling=0.3)
    want = cpu_attention.reference(query, key, value, mask, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_engine_speculation_is_identical_to_target_only() -> None:
    """End to end on a bf16 model (the kernels' home): speculative greedy == plain greedy."""
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(
        tiny_config("qwen2", layers=2, hidden=128), dtype=torch.bfloat16
    ).eval()
    torch.manual_seed(1)
    draft = AutoModelForCausalLM.from_config(
        tiny_config("qwen2", layers=1, hidden=64), dtype=torch.bfloat16
    ).eval()
    prompts = [[5, 9, 13, 7] * 10, [3, 4, 5], list(range(10, 60))]
    params = SamplingParams(max_tokens=24, temperature=0)
    config = EngineConfig(gamma=0, max_slots=3, max_len=128)
    plain = Engine(target, None, config).generate(prompts, params)
    assert target.config._attn_implementation == cpu_attention.NAME
    spec_config = EngineConfig(gamma=4, max_slots=3, max_len=128)
    spec = Engine(target, target, spec_config).generate(prompts, params)
    other = Engine(target, draft, spec_config).generate(prompts, params)
    for a, b, c in zip(plain, spec, other, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
    # The draft (same weights) prefilled its cache through this kernel and the target through
    # SDPA, so a near tie may still be rejected now and then.
    drafted = sum(r.stats.drafted for r in spec)
    assert drafted > 0 and sum(r.stats.accepted for r in spec) >= 0.9 * drafted


def test_without_a_mask_queries_attend_causally_from_the_end() -> None:
    query, key, value = _inputs(2, 4, 2, 3, 11, 16, seed=4)
    got, _ = cpu_attention.attention_forward(None, query, key, value, None, scaling=0.25)
    want = cpu_attention.reference(query, key, value, _causal_mask(2, 3, 11, [11, 11]), 0.25)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    visible = torch.zeros(2, 1, 3, 11, dtype=torch.bool)
    visible[..., :6] = True
    got, _ = cpu_attention.attention_forward(None, query, key, value, visible, scaling=0.25)
    want = cpu_attention.reference(query, key, value, visible, 0.25)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def _run(query, key, value, mask, scaling):
    out = cpu_attention._kernel(query, key, value, mask, scaling)
    assert out is not None
    return out


@pytest.mark.parametrize("heads,kv_heads,dim", [(12, 2, 128), (14, 2, 64), (6, 1, 128)])
def test_query_is_bit_identical_alone_and_in_any_kv_group(heads, kv_heads, dim, isa) -> None:
    """The kernel works on all G * T queries of a kv head together: a query still gets the bits
    it gets alone, among 3 or 7 queries, beside rows of other lengths, with holes in its mask
    or beside a query whose other keys underflow to p == 0 (the tiles' per-query path)."""
    batch, queries, keys = 3, 7, 90
    query, key, value = _inputs(batch, heads, kv_heads, queries, keys, dim, seed=5)
    mask = _causal_mask(batch, queries, keys, [90, 61, 40]).float()
    mask[1, :, :, 10:14] = float("-inf")  # a hole every query of row 1 skips
    mask[2, :, 3, 5] = float("-inf")  # and one only query 3 of row 2 skips
    # Query 4 of row 0, head 0 puts all its weight on key 7: its other p underflow to 0.
    query[0, 0, 4] = 4.0
    key[0, 0, 7] = 4.0
    scaling = dim**-0.5
    together = _run(query, key, value, mask, scaling)
    want = cpu_attention.reference(query, key, value, mask, scaling)
    torch.testing.assert_close(together.float(), want, rtol=1e-2, atol=1e-2)
    for b in range(batch):
        for t in range(queries):
            alone = _run(
                query[b : b + 1, :, t : t + 1], key[b : b + 1], value[b : b + 1],
                mask[b : b + 1, :, t : t + 1], scaling,
            )  # fmt: skip
            assert torch.equal(alone[0, 0], together[b, t]), (b, t)
            lo = max(0, t - 1)
            three = _run(
                query[b : b + 1, :, lo : lo + 3], key[b : b + 1], value[b : b + 1],
                mask[b : b + 1, :, lo : lo + 3], scaling,
            )  # fmt: skip
            assert torch.equal(three[0, t - lo], together[b, t]), (b, t)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_splitting_a_kv_group_between_threads_does_not_change_bits(threads, isa) -> None:
    """With fewer kv heads than threads the kernel splits a head's queries into chunks."""
    query, key, value = _inputs(1, 12, 2, 5, 70, 128, seed=6)
    mask = _causal_mask(1, 5, 70, [70]).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = _run(query, key, value, mask, 0.09)
        torch.set_num_threads(threads)
        got = _run(query, key, value, mask, 0.09)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


def test_invisible_keys_inside_the_range_have_no_influence(isa) -> None:
    query, key, value = _inputs(2, 12, 2, 3, 40, 64, seed=7)
    mask = _causal_mask(2, 3, 40, [40, 33]).float()
    mask[:, :, :, 8:19] = float("-inf")
    before = _run(query, key, value, mask, 0.125)
    key[:, :, 8:19] = 1000.0
    value[:, :, 8:19] = float("nan")
    after = _run(query, key, value, mask, 0.125)
    assert torch.equal(before, after) and bool(after.isfinite().all())


def test_a_query_that_sees_nothing_gets_zeros_and_leaves_the_others_alone(isa) -> None:
    query, key, value = _inputs(1, 4, 2, 3, 20, 32, seed=8)
    mask = _causal_mask(1, 3, 20, [20]).float()
    together = _run(query, key, value, mask, 0.2)
    mask[:, :, 1] = float("-inf")
    got = _run(query, key, value, mask, 0.2)
    assert torch.equal(got[0, 1], torch.zeros(4, 32, dtype=torch.bfloat16))
    assert torch.equal(got[0, 0], together[0, 0]) and torch.equal(got[0, 2], together[0, 2])


def test_vector_exp_is_within_two_ulp_of_exp() -> None:
    x = torch.cat([torch.linspace(-87.3, 88.0, 400_001), torch.tensor([0.0, -0.0, 1e-9, -1e-9])])
    got = cpu_attention.vector_exp(x)
    want = torch.exp(x.double()).float()
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 2
    assert torch.equal(cpu_attention.vector_exp(torch.zeros(3)), torch.ones(3))
    # Below ln(FLT_MIN) the result is 0 rather than a denormal; -inf gives 0 (masked keys).
    tiny = torch.tensor([-87.5, -88.0, -103.0, -1e4, -3e38, float("-inf")])
    assert torch.equal(cpu_attention.vector_exp(tiny), torch.zeros(6))
    assert bool(cpu_attention.vector_exp(torch.tensor([float("nan")])).isnan().all())
