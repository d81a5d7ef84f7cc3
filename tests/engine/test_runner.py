from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from engine.runner import ModelRunner, RaggedBatch, UnsupportedArchitectureError
from tests.engine.conftest import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ragged_batch_matches_separate_full_forwards(arch: str) -> None:
    model = tiny_model(arch)
    runner = ModelRunner(model, num_slots=4, capacity=64)
    a, b = list(range(5, 17)), list(range(30, 37))
    # Rows of different lengths in non-adjacent slots, then uneven continuation chunks.
    first = runner.forward(RaggedBatch([a[:11], b[:4]], [2, 0], [0, 0], [11, 4]), output="all")
    second = runner.forward(RaggedBatch([a[11:12], b[4:7]], [2, 0], [11, 4], [1, 3]), output="all")
    with torch.no_grad():
        ref_a = model(torch.tensor([a])).logits[0]
        ref_b = model(torch.tensor([b])).logits[0]
    torch.testing.assert_close(first[0, :11], ref_a[:11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second[0, 0], ref_a[11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first[1, :4], ref_b[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second[1, :3], ref_b[4:7], atol=1e-4, rtol=1e-4)
    # Rewriting position 11 (what rollback then re-feeding does) gives the same logits again.
    again = runner.forward(RaggedBatch([[a[11]]], [2], [11], [1]))
    torch.testing.assert_close(again[0], ref_a[11], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_cache_goes_in_under_the_name_the_forward_takes(arch: str) -> None:
    # transformers 5.2x took the slot cache as past_key_values with a FutureWarning (gone in
    # 5.40); passed as what the installed forward names it, it warns nothing and still works.
    runner = ModelRunner(tiny_model(arch), num_slots=2, capacity=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        logits = runner.forward(RaggedBatch([[5, 6, 7]], [0], [0], [3]))
    assert logits is not None and logits.shape == (1, runner.vocab_size)


def test_cache_is_allocated_at_start_with_the_model_shapes() -> None:
    model = tiny_model("qwen2")
    runner = ModelRunner(model, num_slots=3, capacity=40)
    layers = model.config.num_hidden_layers
    assert len(runner.cache.keys) == layers
    assert runner.cache.keys[0].shape == (4, 2, 40, 16)  # slots + trash, kv heads, len, dim
    assert runner.cache.nbytes() == 2 * layers * 4 * 2 * 40 * 16 * 4


def test_unsupported_architecture_is_refused() -> None:
    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="bloom.*supported: llama"):
        ModelRunner(model, num_slots=1, capacity=8)
