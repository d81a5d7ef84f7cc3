from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from engine import cpu_attention, cpu_linear, fused_decoder
from engine.config import EngineConfig, SamplingParams
from engine.cpu_linear import patch_model
from engine.engine import Engine
from engine.runner import ModelRunner, RaggedBatch
from tests.engine.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    not fused_decoder.available(), reason="CPU kernels not available here"
)


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch, layers=2, hidden=128)
    for name, value in overrides.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    patch_model(model)
    model.set_attn_implementation(cpu_attention.NAME)
    return model.requires_grad_(False)


@pytest.mark.parametrize("rows", [3, 70_000 // 96])  # one thread, and the parallel path
def test_add_rms_norm_matches_the_module_and_adds_the_residual(rows: int) -> None:
    x, delta = _bf16(rows, 96, seed=0), _bf16(rows, 96, seed=1)
    module = Qwen2RMSNorm(96, eps=1e-5).bfloat16()
    module.weight.data = _bf16(96, seed=2)
    want_x = x + delta
    want = module(want_x)
    out = torch.empty_like(x)
    fused_decoder.add_rms_norm(x, delta, module.weight, 1e-5, out)
    assert torch.equal(x, want_x)  # residual updated in place, rounded like torch's add
    # Only the order of the sum of squares differs from torch's mean.
    torch.testing.assert_close(out.float(), want.float(), rtol=8e-3, atol=1e-5)
    assert (out != want).float().mean() < 0.01


def test_rope_matches_transformers_rotary() -> None:
    batch, tokens, heads, dim = 2, 5, 3, 16
    x = _bf16(batch, tokens, heads * dim, seed=3)
    angles = torch.rand(batch, tokens, dim // 2, generator=torch.Generator().manual_seed(4)) * 9
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    q = x.view(batch, tokens, heads, dim).transpose(1, 2)
    want, _ = apply_rotary_pos_emb(q, q, cos, sin)
    got = fused_decoder.rope_(x.clone(), cos, sin, dim).view(batch, tokens, heads, dim)
    assert torch.equal(got.transpose(1, 2), want)


@pytest.mark.parametrize("rows", [3, 7_000])  # one thread; parallel
def test_silu_mul_matches_torch_within_one_rounding(rows: int) -> None:
    gate_up = _bf16(rows, 2 * 20, seed=5) * 4  # width 20: vector loop + scalar tail
    got = fused_decoder.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-6)
    assert (got != want).float().mean() < 0.02


def test_silu_mul_gives_an_element_the_same_value_in_the_vector_loop_and_the_tail() -> None:
    gate, up = _bf16(12, seed=7) * 4, _bf16(12, seed=8)
    tail = fused_decoder.silu_mul(torch.cat([gate, up]))[8:]  # 8..11: the scalar tail
    vector = fused_decoder.silu_mul(torch.cat([gate[4:], up[4:]]))[4:]
    assert torch.equal(tail, vector)


def test_concatenated_projections_compute_the_same_and_share_weights() -> None:
    model = _model("qwen2")
    attn = model.model.layers[0].self_attn
    x = _bf16(2, 3, 128, seed=9)
    want = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    fused = cpu_linear.concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
    assert isinstance(fused, cpu_linear.FastLinear) and fused.out_features == 128 + 2 * 64
    assert torch.equal(fused(x), torch.cat(want, dim=-1))
    assert attn.k_proj.weight.data_ptr() == fused.weight[128].data_ptr()  # a view, no copy
    originals = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert all(torch.equal(m(x), w) for m, w in zip(originals, want, strict=True))
    int8 = [cpu_linear.Int8Linear(torch.nn.Linear(128, n).bfloat16()) for n in (64, 40)]
    want = torch.cat([m(x) for m in int8], dim=-1)
    fused = cpu_linear.concatenate(int8)
    assert isinstance(fused, cpu_linear.Int8Linear)
    assert torch.equal(fused(x), want)
    # Packed in whole groups of rows, the members' int8 weights are views of the fused one.
    assert int8[1].packed.data_ptr() == fused.packed[64].data_ptr()
    assert all(torch.equal(m(x), w) for m, w in zip(int8, want.split([64, 40], -1), strict=True))
    # Members not in whole groups keep their own copies; the fused layer is packed afresh.
    odd = [cpu_linear.Int8Linear(torch.nn.Linear(128, n).bfloat16()) for n in (6, 10)]
    want = torch.cat([m(x) for m in odd], dim=-1)
    fused = cpu_linear.concatenate(odd)
    assert torch.equal(fused(x), want)
    assert torch.equal(fused.qweight, torch.cat([m.qweight for m in odd]))
    assert cpu_linear.concatenate([attn.o_proj, int8[0]]) is None  # different kinds


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_forward_gives_the_modules_logits(arch: str) -> None:
    model = _model(arch)
    fused = ModelRunner(model, num_slots=2, capacity=64, fused=True)
    modules = ModelRunner(model, num_slots=2, capacity=64, fused=False)
    assert fused.fused is not None and modules.fused is None
    prompts = RaggedBatch([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12]], [0, 1], [0, 0], [7, 3])
    step = RaggedBatch([[40, 41], [42]], [0, 1], [7, 3], [2, 1])
    for batch in (prompts, step):
        got, want = fused.forward(batch, "all"), modules.forward(batch, "all")
        real = torch.arange(got.shape[1])[None, :] < torch.tensor(batch.num_new)[:, None]
        torch.testing.assert_close(got[real], want[real], rtol=2e-2, atol=2e-2)
        assert torch.equal(got[real].argmax(-1), want[real].argmax(-1))
    # and it wrote the same K/V into the slots
    for layer in range(2):
        torch.testing.assert_close(
            fused.cache.slot_keys(layer, 0, 9).float(),
            modules.cache.slot_keys(layer, 0, 9).float(),
            rtol=2e-2,
            atol=2e-2,
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_c_step_is_the_python_layer_loop_bit_for_bit(arch: str, weights: str, isa: str) -> None:
    torch.manual_seed(3)
    config = tiny_config(arch, layers=2, hidden=128)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    patch_model(model, weights=weights)
    model.set_attn_implementation(cpu_attention.NAME)
    model.requires_grad_(False)
    step = ModelRunner(model, num_slots=3, capacity=64)
    loop = ModelRunner(model, num_slots=3, capacity=64)
    assert step.fused is not None and loop.fused is not None
    loop.fused.use_step = False
    prompts = RaggedBatch([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12]], [2, 0], [0, 0], [7, 3])
    # Slots out of order (the gather path), ragged widths, then one decode row; int4 copies
    # serve up to 2 tokens (the decode row), int8 ones up to 8 (the 2 x 3), bf16 more (3 x 3).
    forwards = [
        RaggedBatch([[40, 41, 42], [43]], [2, 0], [7, 3], [3, 1]),
        RaggedBatch([[44]], [0], [4], [1]),
        RaggedBatch([[45, 46, 47]] * 3, [0, 1, 2], [5, 0, 10], [3, 3, 3]),
    ]
    for runner in (step, loop):
        with cpu_linear.prompt_gemm():
            runner.forward(prompts, "none")
    for batch in forwards:
        got, want = step.forward(batch, "all"), loop.forward(batch, "all")
        assert torch.equal(got, want)
    assert step.fused._step_table is not None  # the C step ran
    for layer in range(2):
        assert torch.equal(step.cache.keys[layer], loop.cache.keys[layer])
        assert torch.equal(step.cache.values[layer], loop.cache.values[layer])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_prefill_without_outputs_stops_at_the_last_layers_kv(arch: str) -> None:
    """A prompt prefill wants only K/V (the first round feeds its last token again): the last
    layer's attention, output projection and MLP are skipped, the cache is the full forward's
    bit for bit, and so is everything decoded after it."""
    model = _model(arch)
    kv_only, full = (ModelRunner(model, num_slots=2, capacity=64) for _ in range(2))
    calls: list[str] = []
    for name, layer in (
        ("first", model.base_model.layers[0]),
        ("last", model.base_model.layers[-1]),
    ):
        down = layer.mlp.down_proj
        down.forward = lambda x, down=down, name=name: (
            calls.append(name),
            type(down).forward(down, x),
        )[1]
    prompts = RaggedBatch([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12]], [0, 1], [0, 0], [7, 3])
    with cpu_linear.prompt_gemm():
        assert kv_only.forward(prompts, "none") is None
        assert calls == ["first"]
        calls.clear()
        assert full.forward(prompts, "hidden") is not None
        assert calls == ["first", "last"]
    layers = len(model.base_model.layers)
    for layer in range(layers):
        assert torch.equal(kv_only.cache.keys[layer], full.cache.keys[layer])
        assert torch.equal(kv_only.cache.values[layer], full.cache.values[layer])
    step = RaggedBatch([[40, 41], [42]], [0, 1], [7, 3], [2, 1])
    assert torch.equal(kv_only.forward(step, "all"), full.forward(step, "all"))


def test_fused_forward_is_batch_invariant(isa: str) -> None:
    """What greedy speculation relies on: a row's logits do not depend on its batch."""
    model = _model("qwen2")
    runner = ModelRunner(model, num_slots=3, capacity=64)
    assert runner.fused is not None
    prompts = [[5, 6, 7, 8, 9], [3, 4, 12, 13, 14, 15, 16], [20, 21]]
    runner.forward(RaggedBatch(prompts, [0, 1, 2], [0, 0, 0], [5, 7, 2]), "none")
    together = runner.forward(
        RaggedBatch([[30, 31, 32], [33], [34, 35]], [0, 1, 2], [5, 7, 2], [3, 1, 2]), "all"
    )
    alone = runner.forward(RaggedBatch([[30, 31, 32]], [0], [5], [3]), "all")
    assert torch.equal(together[0], alone[0])
    one_by_one = [
        runner.forward(RaggedBatch([[t]], [0], [5 + i], [1]), "last")[0]
        for i, t in enumerate([30, 31, 32])
    ]
    assert torch.equal(together[0], torch.stack(one_by_one))


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_ragged_forward_packs_one_token_per_row_with_the_padded_outputs(weights: str) -> None:
    """A row verifying 6 tokens beside rows of one must not pad them all to 6 (every matrix
    product would carry the padding); packed, the real tokens' logits and K/V are bit for bit
    the padded forward's."""
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", layers=2, hidden=128),
                                             dtype=torch.bfloat16).eval()  # fmt: skip
    patch_model(model, weights=weights)
    model.set_attn_implementation(cpu_attention.NAME)
    model.requires_grad_(False)
    packed, padded = (ModelRunner(model, num_slots=3, capacity=64) for _ in range(2))
    padded._packs = lambda batch, width: False  # type: ignore[method-assign]
    prompts = RaggedBatch([[5, 6, 7, 8, 9], [3, 4, 12], [20, 21, 22, 23]], [0, 1, 2], [0] * 3,
                          [5, 3, 4])  # fmt: skip
    with cpu_linear.prompt_gemm():
        assert not packed._packs(prompts, 5)  # prompts keep their rows
        for runner in (packed, padded):
            runner.forward(prompts, "none")
    verify = RaggedBatch([[30], [31, 32, 33, 34, 35, 36], [37, 38]], [2, 0, 1], [4, 5, 3],
                         [1, 6, 2])  # fmt: skip
    assert packed._packs(verify, 6)
    assert not packed._packs(RaggedBatch([[1, 2]] * 2, [0, 1], [11, 8], [2, 2]), 2)
    got, want = packed.forward(verify, "all"), padded.forward(verify, "all")
    for row, length in enumerate(verify.num_new):
        assert torch.equal(got[row, :length], want[row, :length])
    assert torch.equal(packed.forward(verify, "last"), padded.forward(verify, "last"))
    for layer in range(2):  # real slots alike; only padding differs, in the trash slot
        assert torch.equal(packed.cache.keys[layer][:3], padded.cache.keys[layer][:3])
        assert torch.equal(packed.cache.values[layer][:3], padded.cache.values[layer][:3])


def test_models_the_forward_cannot_run_keep_transformers_modules() -> None:
    assert fused_decoder.FusedDecoder.build(_model("qwen2").float()) is None  # fp32
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2"), dtype=torch.bfloat16)
    assert fused_decoder.FusedDecoder.build(gpt2) is None
    sliding = _model("qwen2", sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert "sliding_attention" in sliding.config.layer_types
    assert fused_decoder.FusedDecoder.build(sliding) is None
    off = Engine(_model("qwen2"), None, EngineConfig(gamma=0, max_slots=1, cpu_kernels=False))
    assert off.target.fused is None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_speculation_through_the_fused_forward_is_identical_to_target_only(arch: str) -> None:
    target, draft = _model(arch, seed=0), _model(arch, seed=1)
    prompts = [[5, 9, 13, 7] * 6, [3, 4, 5], list(range(10, 40))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain_engine = Engine(target, None, EngineConfig(gamma=0, max_slots=3, max_len=96))
    assert plain_engine.target.fused is not None
    plain = plain_engine.generate(prompts, params)
    spec_config = EngineConfig(gamma=3, max_slots=3, max_len=96, adaptive_gamma=False)
    for drafter in (target, draft):  # all accepted, mostly rejected
        spec_engine = Engine(target, drafter, spec_config)
        assert spec_engine.proposer is not None and spec_engine.proposer.runner.fused is not None
        spec = spec_engine.generate(prompts, params)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        assert spec_engine.stats.drafted > 0
