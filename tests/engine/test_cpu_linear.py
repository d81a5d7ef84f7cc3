from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from engine import cpu_linear
from engine.cpu_linear import FastLinear, Int4Linear, Int8Linear, linear, patch_model
from tests.engine.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    not cpu_linear.available(),
    reason="CPU bf16 kernel unavailable (needs x86-64 AVX2+FMA and gcc, "
    "and SPECSERVE_CPU_KERNELS not set to 0)",
)


def _inputs(
    m: int, n: int, k: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g)
    return x, w, b


# 70 crosses the kernel's 64-row panels of x.
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 17, 33, 70])
@pytest.mark.parametrize("n,k", [(37, 61), (64, 128), (130, 8), (9, 1003)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_fp32_reference(m: int, n: int, k: int, with_bias: bool, isa: str) -> None:
    x, w, b = _inputs(m, n, k)
    bias = b if with_bias else None
    # AVX512-BF16 multiplies bf16 by bf16: fp32 activations are rounded first.
    want = F.linear(x.bfloat16().float() if isa == "avx512" else x, w.float(), bias)
    # fp32 x gives fp32 output: only the accumulation order differs from the reference.
    got = linear(x, w, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # bf16 x: the same up to bf16 rounding of the input and of the output.
    xb = x.bfloat16()
    got_b = linear(xb, w, None if bias is None else bias.bfloat16())
    assert got_b.dtype == torch.bfloat16
    want_b = F.linear(xb.float(), w.float(), None if bias is None else bias.bfloat16().float())
    torch.testing.assert_close(got_b.float(), want_b, rtol=1e-2, atol=1e-2)


def test_leading_dims_and_noncontiguous_input(isa: str) -> None:
    x, w, b = _inputs(12, 24, 40)
    x = x.bfloat16().float()  # exact in either kernel
    x3 = x.reshape(3, 4, 40).transpose(0, 1)  # non-contiguous [4, 3, 40]
    got = linear(x3, w, b)
    assert got.shape == (4, 3, 24)
    torch.testing.assert_close(got, F.linear(x3, w.float(), b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 6, 8, 12, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(m: int, dtype: torch.dtype, isa: str) -> None:
    x, w, b = _inputs(m, 203, 1003, seed=m)
    x = x.to(dtype)
    full = linear(x, w, b.to(dtype))
    for i in range(m):
        alone = linear(x[i : i + 1], w, b.to(dtype))
        assert torch.equal(full[i : i + 1], alone), f"row {i} of {m} differs"
    # Independent of the other rows' contents as well as their number.
    other = torch.randn_like(x.float()).to(dtype)
    other[0] = x[0]
    assert torch.equal(linear(other, w, b.to(dtype))[0], full[0])


def test_batch_invariance_across_thread_counts(isa: str) -> None:
    x, w, _ = _inputs(5, 203, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(linear(x, w), one)


def test_falls_back_for_unsupported_inputs() -> None:
    x, w, b = _inputs(3, 8, 16)
    w32 = w.float()
    torch.testing.assert_close(linear(x, w32, b), F.linear(x, w32, b))
    x64 = x.double()
    assert linear(x64, w.double(), b.double()).dtype == torch.float64
    wt = w.t().contiguous().t()  # same values, column-major
    torch.testing.assert_close(linear(x, wt, b), F.linear(x, wt.float(), b))
    assert linear(x[:0], w, b).shape == (0, 8)
    xg = x.clone().requires_grad_(True)
    linear(xg, w.float(), b).sum().backward()  # autograd goes through torch
    assert xg.grad is not None


def test_long_prompt_inputs_take_the_prompt_gemm_unless_the_fp32_route_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_linear, "_NATIVE_BF16", False)
    monkeypatch.setattr(cpu_linear, "PROMPT_GEMM_MIN_ROWS", None)  # as tuned on a Zen 3 box
    monkeypatch.setattr(cpu_linear, "_torch_fp32_gemm", lambda *a: pytest.fail("fp32 route taken"))
    rows = cpu_linear.PROMPT_TILED_MIN_ROWS
    x, weight, bias = _inputs(rows + 200, 40, 64)
    calls: list[int] = []
    real = cpu_linear._run_gemm
    monkeypatch.setattr(
        cpu_linear, "_run_gemm", lambda lib, x, *a: calls.append(x.shape[0]) or real(lib, x, *a)
    )
    outside = linear(x, weight, bias)
    with cpu_linear.prompt_gemm():
        inside = linear(x, weight, bias)
        short = linear(x[: rows - 1], weight, bias)
    assert calls == [rows + 200]  # neither outside the block nor for a short input
    assert torch.equal(short, outside[: rows - 1])  # the decode kernel's result
    want = F.linear(x.double(), weight.double(), bias.double()).float()
    torch.testing.assert_close(inside, want, rtol=1e-5, atol=1e-5)


# M: one tile, ragged tiles, across the 256-row blocks; N: ragged 16-column panels; K: below,
# at and across the 8-column transposes and the 256-column blocks.
@pytest.mark.parametrize("m", [1, 6, 7, 97, 300])
@pytest.mark.parametrize("n,k", [(1, 1), (16, 8), (17, 9), (40, 300), (5, 530)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prompt_gemm_matches_the_reference(m: int, n: int, k: int, with_bias: bool) -> None:
    x, w, b = _inputs(m, n, k, seed=m + n + k)
    bias = b if with_bias else None
    lib = cpu_linear._load()
    got = cpu_linear._run_gemm(lib, x, w, bias)
    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    got_b = cpu_linear._run_gemm(lib, xb, w, None if bias is None else bias.bfloat16())
    assert got_b.dtype == torch.bfloat16
    bias_b = None if bias is None else bias.bfloat16().double()
    want_b = F.linear(xb.double(), w.double(), bias_b)
    torch.testing.assert_close(got_b.double(), want_b, rtol=1e-2, atol=1e-2)


def test_prompt_gemm_gives_a_row_the_same_result_in_any_batch() -> None:
    # Each output is one lane summed over k in order, whatever tile, block or thread holds it.
    x, w, b = _inputs(300, 40, 530)
    lib = cpu_linear._load()
    whole = cpu_linear._run_gemm(lib, x, w, b)
    for row in (0, 5, 6, 255, 299):
        assert torch.equal(cpu_linear._run_gemm(lib, x[row : row + 1], w, b)[0], whole[row])
    assert torch.equal(cpu_linear._run_gemm(lib, x[250:], w, b), whole[250:])


class _FakeRoutes:
    """Both prompt routes on a fake clock: fp32 pays a fixed weight copy plus a cost per row,
    ours a dearer cost per row; the calls numbered in ``spells`` (from 0, warm-ups
    included) fall in a slow spell of the machine."""

    def __init__(self, copy: float, spells: frozenset[int] = frozenset()) -> None:
        self.now = 0.0
        self.copy = copy
        self.spells = spells
        self.calls: list[tuple[str, int]] = []

    def _spend(self, route: str, rows: int, seconds: float) -> None:
        if len(self.calls) in self.spells:
            seconds += 1000.0
        self.calls.append((route, rows))
        self.now += seconds

    def fp32(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        self._spend("fp32", x.shape[0], self.copy + 1.0 * x.shape[0])
        return x

    def ours(self, lib, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        self._spend("ours", x.shape[0], 1.5 * x.shape[0])
        return x

    def choose(self, monkeypatch: pytest.MonkeyPatch, repeats: int = 2) -> int | None:
        monkeypatch.setattr(cpu_linear, "_torch_fp32_gemm", self.fp32)
        monkeypatch.setattr(cpu_linear, "_run_gemm", self.ours)
        weight = torch.zeros(8, 16, dtype=torch.bfloat16)
        return cpu_linear.choose_prompt_gemm_rows(
            weight, max_rows=1024, repeats=repeats, clock=lambda: self.now
        )


@pytest.mark.parametrize(
    ("copy", "want", "sizes"),
    [
        (100.0, 256, [1024, 512, 256, 128]),  # fp32 wins once its copy is shared by 200+ rows
        (10.0, 128, [1024, 512, 256, 128]),  # fp32 wins at every size
        (2000.0, None, [1024]),  # ours wins even at the largest: nothing else timed
    ],
)
def test_prompt_gemm_rows_are_where_fp32_starts_to_win(
    copy: float, want: int | None, sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = _FakeRoutes(copy)
    assert routes.choose(monkeypatch) == want
    timed = [rows for _, rows in routes.calls[2:]]  # after one untimed warm-up per route
    assert sorted(set(timed), reverse=True) == sizes
    assert all(timed.count(rows) == 4 for rows in sizes)  # two routes, two repeats


def test_prompt_gemm_timing_survives_a_slow_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first timed call (fp32 at 1024 rows, after the two warm-ups) is slowed down: the best
    # of two repeats still finds the true crossover, a single timing would not.
    assert _FakeRoutes(100.0, spells=frozenset({2})).choose(monkeypatch) == 256
    assert _FakeRoutes(100.0, spells=frozenset({2})).choose(monkeypatch, repeats=1) is None


def test_tuning_happens_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "_NATIVE_BF16", False)
    monkeypatch.setattr(cpu_linear, "_prompt_gemm_tuned", False)
    monkeypatch.setattr(cpu_linear, "PROMPT_GEMM_MIN_ROWS", 128)
    choices = iter([512, 128])
    monkeypatch.setattr(cpu_linear, "choose_prompt_gemm_rows", lambda *a, **k: next(choices))
    weight = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert cpu_linear.tune_prompt_gemm(weight) == 512
    assert cpu_linear.tune_prompt_gemm(weight) == 512  # a second engine prefills alike
    assert cpu_linear.PROMPT_GEMM_MIN_ROWS == 512
    monkeypatch.setattr(cpu_linear, "_prompt_gemm_tuned", False)
    monkeypatch.setattr(cpu_linear, "_NATIVE_BF16", True)  # prompts take torch's bf16 GEMM
    assert cpu_linear.tune_prompt_gemm(weight) == 512
    assert next(choices) == 128  # never asked


def _reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "_lib", None)
    monkeypatch.setattr(cpu_linear, "_tried", False)


def test_env_var_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    _reload(monkeypatch)
    monkeypatch.setenv("SPECSERVE_CPU_KERNELS", "0")
    assert not cpu_linear.available()
    assert patch_model(nn.Sequential(nn.Linear(8, 8).bfloat16())) == 0


def test_isa_env_var_keeps_the_avx2_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cpu_linear.isa()
    _reload(monkeypatch)
    monkeypatch.setattr(cpu_linear, "_NATIVE_BF16", None)
    monkeypatch.setenv("SPECSERVE_CPU_ISA", "avx2")
    try:
        assert cpu_linear.isa() == "avx2"
        assert not cpu_linear._native_bf16_gemm()  # prefill as on a CPU without bf16 either
    finally:
        # The reloaded library is the same shared object: its selection is process-wide.
        cpu_linear.set_isa(before)


def test_compile_failure_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _reload(monkeypatch)
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_linear, "_SOURCES", (broken,))
    with caplog.at_level("WARNING", logger="specserve.cpu_linear"):
        assert not cpu_linear.available()
        assert not cpu_linear.available()  # tried once, warned once
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left
    x, w, b = _inputs(2, 4, 8)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w.float(), b))


def test_builds_into_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _reload(monkeypatch)
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    assert cpu_linear.available()
    assert len(list((tmp_path / "kernels").glob("specserve_cpu-*.so"))) == 1


def test_fast_linear_shares_parameters() -> None:
    base = nn.Linear(16, 8).bfloat16()
    fast = FastLinear(base)
    assert fast.weight is base.weight and fast.bias is base.bias
    assert isinstance(fast, nn.Linear)
    assert set(fast.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 16).bfloat16()
    torch.testing.assert_close(fast(x).float(), base(x).float(), rtol=2e-2, atol=2e-2)


def _tiny_qwen2(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_config("qwen2", layers=2, hidden=64, vocab=320)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("tied", [False, True])
def test_patch_model_qwen2(tied: bool) -> None:
    model = _tiny_qwen2(tied)
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits.float()
    # Per layer: q, k, v, o and gate, up, down projections; plus the LM head.
    assert patch_model(model) == 2 * 7 + 1
    assert isinstance(model.get_output_embeddings(), FastLinear)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        got = model(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert patch_model(model) == 0  # already patched


@pytest.mark.parametrize("attention", ["eager", "specserve_cpu"])
def test_patched_model_verify_forward_matches_decode_steps(attention: str) -> None:
    """What speculation relies on: k tokens in one forward give the logits of k decode steps.

    Attention must be batch invariant too: transformers' eager attention and ours are on CPU,
    SDPA is not.
    """
    model = _tiny_qwen2(False)
    model.set_attn_implementation(attention)
    patch_model(model)
    g = torch.Generator().manual_seed(3)
    prompt, new = (
        torch.randint(0, 320, (1, 20), generator=g),
        torch.randint(0, 320, (1, 5), generator=g),
    )
    # The cache argument's name depends on the transformers version (as in ModelRunner).
    named = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        cache = {named: DynamicCache(config=model.config)}
        model(prompt, **cache, use_cache=True)
        block = model(new, **cache, use_cache=True).logits
        cache[named].crop(-new.shape[1])
        steps = [
            model(new[:, i : i + 1], **cache, use_cache=True).logits for i in range(new.shape[1])
        ]
    assert torch.equal(block, torch.cat(steps, dim=1))


def test_patch_model_skips_fp32_models() -> None:
    model = _tiny_qwen2(False).float()
    assert patch_model(model) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "gpt2", "gpt_neox"])
def test_patch_model_other_architectures(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits.float()
    assert patch_model(model) > 0
    with torch.no_grad():
        got = model(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_quantize_int8_round_trip() -> None:
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(300, 64, generator=g) * torch.rand(300, 1, generator=g)).bfloat16()
    qweight, scale = cpu_linear.quantize_int8(weight, chunk=128)
    assert qweight.dtype == torch.int8 and qweight.abs().max().item() == 127
    restored = qweight.float() * scale[:, None]
    row_max = weight.float().abs().amax(1, keepdim=True)
    assert ((restored - weight.float()).abs() <= row_max / 254 + 1e-6).all()


def test_pack_int8_groups_rows_block_by_block() -> None:
    qweight = torch.arange(6 * 64).remainder(251).sub(125).to(torch.int8).view(6, 64)
    packed = cpu_linear.pack_int8(qweight)
    group = cpu_linear.INT8_GROUP
    assert packed.shape == (8, 64)  # 6 rows padded to whole groups of 4
    block = cpu_linear.INT8_BLOCK
    # The stream of the first group: block 0 of rows 0..3, then block 1 of rows 0..3.
    stream = packed[:group].flatten()
    assert torch.equal(stream[:block], qweight[0, :block])
    assert torch.equal(stream[block : 2 * block], qweight[1, :block])
    assert torch.equal(stream[group * block : (group + 1) * block], qweight[0, block:])
    assert (packed[group:].view(-1, group, block)[:, 2:] == 0).all()  # padding rows are zero
    assert torch.equal(cpu_linear.unpack_int8(packed, 6), qweight)
    ragged = qweight[:, :40].contiguous()  # not whole blocks: the kernel never takes it
    assert torch.equal(cpu_linear.unpack_int8(cpu_linear.pack_int8(ragged), 6), ragged)


def test_quantize_activations_blockwise() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 96, generator=g)
    x[0, 5] = 40.0  # an outlier flattens only its own block
    x[1, 32:64] = 0.0  # an all-zero block must not divide by zero
    xq, block_scale = cpu_linear.quantize_activations(x)
    assert xq.dtype == torch.int8 and block_scale.shape == (3, 3)
    assert block_scale[1, 1] == 0 and (xq[1, 32:64] == 0).all()
    restored = (xq.float().reshape(3, 3, 32) * block_scale[..., None]).reshape(3, 96)
    assert ((restored - x).abs() <= block_scale.repeat_interleave(32, 1) / 2 + 1e-6).all()
    assert xq[0, 32:].abs().max() == 127  # other blocks keep their full range


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_quantized_reference(m: int, dtype: torch.dtype, isa: str) -> None:
    base = nn.Linear(96, 37).bfloat16()
    fast = cpu_linear.Int8Linear(base)
    x = torch.randn(m, 96).to(dtype)
    want = cpu_linear.int8_reference(x.float(), fast.qweight, fast.scale, base.bias.float())
    got = fast(x)
    assert got.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)
    # Close to the bf16 layer it replaces, too: int8 weights and activations lose little.
    torch.testing.assert_close(got.float(), base(x.bfloat16()).float(), rtol=0.05, atol=0.05)


def test_int8_linear_rows_do_not_depend_on_the_batch(isa: str) -> None:
    # Each row's quantisation and dot products are its own, so a draft row proposes the same
    # tokens alone or batched with others.
    base = nn.Linear(128, 50).bfloat16()
    fast = cpu_linear.Int8Linear(base)
    x = torch.randn(5, 128)
    batched = fast(x)
    for row in range(5):
        assert torch.equal(fast(x[row : row + 1]), batched[row : row + 1])


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("n", [4, 37, 70, 130])
def test_int8_kernels_agree_bit_for_bit(m: int, n: int) -> None:
    """The VNNI kernel forms each int32 lane from the same 4 products as the AVX2 one and sums
    the same way: switching kernels must not move a draft proposal."""
    if "avx512" not in cpu_linear.supported_isas():
        pytest.skip("this CPU has no AVX512-VNNI")
    g = torch.Generator().manual_seed(n * 100 + m)
    base = nn.Linear(160, n).bfloat16()
    fast = cpu_linear.Int8Linear(base)
    # Weights at both ends of the int8 range, where an offset trick would overflow first.
    fast.packed[0, :8] = torch.tensor([127, -127, 127, -127, 1, -1, 0, 127], dtype=torch.int8)
    x = torch.randn(m, 160, generator=g).bfloat16()
    before = cpu_linear.isa()
    try:
        results = {}
        for name in cpu_linear.ISAS:
            cpu_linear.set_isa(name)
            results[name] = cpu_linear._run_int8(
                cpu_linear._lib, x, fast.packed, n, fast.scale, base.bias
            )
    finally:
        cpu_linear.set_isa(before)
    assert torch.equal(results["avx2"], results["avx512"])


def test_int8_linear_runs_long_inputs_on_the_bf16_weights() -> None:
    base = nn.Linear(64, 24).bfloat16()
    fast = cpu_linear.Int8Linear(base)
    x = torch.randn(Int8Linear.MAX_ROWS + 1, 64)
    assert torch.equal(fast(x), linear(x, base.weight, base.bias))
    assert fast.weight is base.weight
    assert set(fast.state_dict()) == {"weight", "bias"}  # the int8 copy is not saved


def test_patch_model_int8_for_drafts() -> None:
    model = _tiny_qwen2(True)
    assert patch_model(model, weights="int8") == 2 * 7 + 1
    head = model.get_output_embeddings()
    assert isinstance(head, cpu_linear.Int8Linear)
    assert head.weight is model.get_input_embeddings().weight


def test_quantize_int4_error_bound_and_grid_values_exact() -> None:
    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(300, 96, generator=g) * torch.rand(300, 1, generator=g)).bfloat16()
    weight[7, 32:64] = 0.25  # a constant group: d = 0, every value exact through m
    q, d, m = cpu_linear.quantize_int4(weight, chunk=128)
    assert q.dtype == torch.uint8 and q.shape == (300, 96) and int(q.max()) == 15
    assert d.dtype == m.dtype == torch.float16 and d.shape == m.shape == (300, 3)
    groups = weight.float().reshape(300, 3, 32)
    restored = q.float().reshape(300, 3, 32) * d.float()[..., None] + m.float()[..., None]
    # Half a step, plus what rounding d and m to fp16 can add at the group's extremes.
    bound = d.float()[..., None] / 2 + groups.abs().amax(-1, keepdim=True) * 2**-9 + 1e-7
    assert ((restored - groups).abs() <= bound).all()
    assert d[7, 1] == 0 and (restored[7, 1] == 0.25).all()
    # Values already on a grid of fp16 d and m (0 and 15 in every group) come back exactly.
    levels = torch.randint(0, 16, (40, 64), generator=g)
    levels[:, 0], levels[:, 1], levels[:, 32], levels[:, 33] = 0, 15, 0, 15
    step = torch.tensor([2.0**-6, 3 * 2.0**-7]).repeat(40, 1)
    low = torch.tensor([-0.125, -0.3125]).repeat(40, 1)
    grid = levels.float().reshape(40, 2, 32) * step[..., None] + low[..., None]
    q, d, m = cpu_linear.quantize_int4(grid.reshape(40, 64).bfloat16())
    assert torch.equal(q.long(), levels)
    assert torch.equal(d.float(), step) and torch.equal(m.float(), low)
    with pytest.raises(ValueError, match="whole blocks"):
        cpu_linear.quantize_int4(torch.zeros(4, 40).bfloat16())


def test_pack_int4_layout_and_round_trip() -> None:
    g = torch.Generator().manual_seed(12)
    q = torch.randint(0, 16, (6, 64), generator=g).to(torch.uint8)
    d = torch.rand(6, 2, generator=g).half()
    m = -torch.rand(6, 2, generator=g).half()
    packed = cpu_linear.pack_int4(q, d, m)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2 * 80)  # 6 rows -> 2 groups
    block = packed[0, :80]  # group 0, block 0: rows 0|1 and 2|3 as nibbles, then d, then m
    assert torch.equal(block[:32], q[0, :32] | (q[1, :32] << 4))
    assert torch.equal(block[32:64], q[2, :32] | (q[3, :32] << 4))
    assert torch.equal(block[64:72].view(torch.float16), d[:4, 0])
    assert torch.equal(block[72:80].view(torch.float16), m[:4, 0])
    assert torch.equal(packed[0, 80:112], q[0, 32:] | (q[1, 32:] << 4))
    padding = packed[1].view(2, 80)  # group 1: rows 4, 5 and the zero padding rows 6, 7
    assert (padding[:, 32:64] == 0).all() and (padding[:, 68:72] == 0).all()
    assert (padding[:, 76:80] == 0).all()
    got = cpu_linear.unpack_int4(packed, 6)
    for want, have in zip((q, d, m), got, strict=True):
        assert torch.equal(have, want)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [4, 13, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_reference(m: int, n: int, dtype: torch.dtype, isa: str) -> None:
    g = torch.Generator().manual_seed(100 * m + n)
    k = 96 if n != 13 else 320
    weight = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    q, d, mins = cpu_linear.quantize_int4(weight)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = cpu_linear._run_int4(cpu_linear._lib, x, cpu_linear.pack_int4(q, d, mins), n, bias)
    assert got is not None and got.dtype == dtype and got.shape == (m, n)
    want = cpu_linear.int4_reference(x.float(), q, d, mins, bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)
    # And near the bf16 product it stands for (16 levels per group of 32: ~10 % noise).
    exact = F.linear(x.float(), weight.float())
    assert (got.float() - bias.float() - exact).norm() < 0.2 * exact.norm()


def test_int4_kernel_refuses_what_it_cannot_take() -> None:
    packed = cpu_linear.pack_int4(*cpu_linear.quantize_int4(torch.randn(8, 64).bfloat16()))
    too_many = torch.randn(9, 64)  # the kernel's limit: 8 rows
    assert cpu_linear._run_int4(cpu_linear._lib, too_many, packed, 8, None) is None
    assert cpu_linear._run_int4(cpu_linear._lib, too_many[:8], packed, 8, None) is not None


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n", [4, 37, 130])
def test_int4_kernels_agree_bit_for_bit(m: int, n: int) -> None:
    """Same exact int32 dot products and the same fp32 operations in the AVX2 and VNNI
    versions: switching kernels must not move a draft proposal."""
    if "avx512" not in cpu_linear.supported_isas():
        pytest.skip("this CPU has no AVX512-VNNI")
    g = torch.Generator().manual_seed(n * 100 + m)
    q, d, mins = cpu_linear.quantize_int4(torch.randn(n, 160, generator=g).bfloat16())
    q[0, :8] = torch.tensor([15, 15, 15, 15, 0, 15, 0, 15], dtype=torch.uint8)  # range ends
    packed = cpu_linear.pack_int4(q, d, mins)
    x = torch.randn(m, 160, generator=g).bfloat16()
    x[0, :8] = torch.tensor([-4.0, -4.0, -4.0, -4.0, 4.0, -4.0, 4.0, -4.0])  # xq = -127, 127
    bias = torch.randn(n, generator=g)
    before = cpu_linear.isa()
    try:
        results = {}
        for name in cpu_linear.ISAS:
            cpu_linear.set_isa(name)
            results[name] = cpu_linear._run_int4(cpu_linear._lib, x, packed, n, bias)
    finally:
        cpu_linear.set_isa(before)
    assert results["avx2"] is not None
    assert torch.equal(results["avx2"], results["avx512"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_do_not_depend_on_the_batch_or_threads(dtype: torch.dtype, isa: str) -> None:
    # Each row's quantisation and accumulator are its own, and threads split weight rows only:
    # the kernel gives a row the same result alone, batched, on one thread or two.
    weight = torch.randn(50, 128).bfloat16()
    packed = cpu_linear.pack_int4(*cpu_linear.quantize_int4(weight))
    bias = torch.randn(50).to(dtype)
    x = torch.randn(8, 128).to(dtype)

    def run(rows: torch.Tensor) -> torch.Tensor:
        out = cpu_linear._run_int4(cpu_linear._lib, rows, packed, 50, bias)
        assert out is not None
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = run(x)
        torch.set_num_threads(1)
        assert torch.equal(run(x), batched)
        for rows in (slice(0, 1), slice(3, 4), slice(2, 7), slice(7, 8)):
            assert torch.equal(run(x[rows]), batched[rows])
    finally:
        torch.set_num_threads(threads)


def test_int4_linear_takes_int4_for_two_rows_int8_to_eight_bf16_beyond() -> None:
    base = nn.Linear(64, 24).bfloat16()
    fast = Int4Linear(base)
    q, d, m = fast.quantized
    for rows in (1, Int4Linear.INT4_ROWS):
        short = torch.randn(rows, 64)
        want = cpu_linear.int4_reference(short, q, d, m, base.bias)
        torch.testing.assert_close(fast(short), want, rtol=1e-4, atol=1e-4)
        assert not torch.equal(fast(short), linear(short, base.weight, base.bias))
    middle = torch.randn(2, Int4Linear.INT4_ROWS, 64)  # 4 rows: the int8 copy
    want = cpu_linear.int8_reference(middle, fast.qweight, fast.scale, base.bias)
    torch.testing.assert_close(fast(middle), want, rtol=1e-4, atol=1e-4)
    long = torch.randn(Int4Linear.MAX_ROWS + 1, 64)
    assert torch.equal(fast(long), linear(long, base.weight, base.bias))
    assert fast.weight is base.weight
    assert set(fast.state_dict()) == {"weight", "bias"}  # the quantised copies are not saved


def test_concatenated_int4_linears_share_the_packed_copy() -> None:
    x = torch.randn(3, 128).bfloat16()
    members = [Int4Linear(nn.Linear(128, n).bfloat16()) for n in (64, 40)]
    want = torch.cat([member(x) for member in members], dim=-1)
    fused = cpu_linear.concatenate(members)
    assert isinstance(fused, Int4Linear) and fused.out_features == 104
    assert torch.equal(fused(x), want)
    # Whole groups of rows: the members' packed weights are views of the fused one.
    assert members[1].packed4.data_ptr() == fused.packed4[64 // cpu_linear.INT4_GROUP].data_ptr()
    assert members[1].packed.data_ptr() == fused.packed[64].data_ptr()
    one = x[:1]
    assert torch.equal(fused(one), torch.cat([member(one) for member in members], dim=-1))
    assert all(
        torch.equal(mm(x), w) for mm, w in zip(members, want.split([64, 40], -1), strict=True)
    )
    odd = [Int4Linear(nn.Linear(128, n).bfloat16()) for n in (6, 10)]
    want = torch.cat([member(x) for member in odd], dim=-1)
    fused = cpu_linear.concatenate(odd)
    assert torch.equal(fused(x), want)  # packed afresh
    assert torch.equal(fused.quantized[0], torch.cat([member.quantized[0] for member in odd]))
    assert cpu_linear.concatenate([members[0], Int8Linear(nn.Linear(128, 8).bfloat16())]) is None


def test_patch_model_int4_for_drafts() -> None:
    model = _tiny_qwen2(True)
    assert patch_model(model, weights="int4") == 2 * 7 + 1
    head = model.get_output_embeddings()
    assert isinstance(head, Int4Linear)
    assert head.weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="weights must be one of"):
        patch_model(model, weights="int3")


@pytest.mark.parametrize("native", [False, True])
def test_prompt_gemm_takes_long_inputs_only_inside_its_block(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # native: torch's bf16 GEMM (CPUs with bf16 instructions), else the fp32 route.
    monkeypatch.setattr(cpu_linear, "_NATIVE_BF16", native)
    monkeypatch.setattr(cpu_linear, "PROMPT_GEMM_MIN_ROWS", 128)  # as if tuned to it
    route = "_native_gemm" if native else "_torch_fp32_gemm"
    threshold = cpu_linear.PROMPT_NATIVE_MIN_ROWS if native else cpu_linear.PROMPT_GEMM_MIN_ROWS
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(48, 64, generator=g).bfloat16()
    bias = torch.randn(48, generator=g).bfloat16()
    long = torch.randn(threshold, 64, generator=g).bfloat16()
    short = long[:5]
    outside_long, outside_short = linear(long, weight, bias), linear(short, weight, bias)
    calls = []
    original = getattr(cpu_linear, route)
    monkeypatch.setattr(cpu_linear, route, lambda *a: calls.append(a[0].shape[0]) or original(*a))
    with cpu_linear.prompt_gemm():
        inside_long, inside_short = linear(long, weight, bias), linear(short, weight, bias)
    monkeypatch.setattr(cpu_linear, route, original)
    assert calls == [threshold]  # the short input stayed on the kernel
    assert torch.equal(inside_short, outside_short)
    assert inside_long.dtype == torch.bfloat16
    want = F.linear(long.float(), weight.float(), bias.float())
    torch.testing.assert_close(inside_long.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outside_long.float(), want, rtol=1e-2, atol=1e-2)
    # A smaller layer after a larger one reuses the scratch buffer without stale values.
    with cpu_linear.prompt_gemm():
        small = linear(long[:, :32], weight[:8, :32].contiguous())
    torch.testing.assert_close(
        small.float(), F.linear(long[:, :32].float(), weight[:8, :32].float()), rtol=1e-2, atol=1e-2
    )
    assert not getattr(cpu_linear._prompt_mode, "on", False)
