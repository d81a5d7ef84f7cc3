"""HF generate baselines (plain, assisted, prompt lookup) on tiny random models."""

from __future__ import annotations

from engine.loader import LoadedModel
from loadtest.hf_batch1 import measure_hf
from loadtest.prompts import Prompt
from loadtest.systems import HF_SYSTEMS
from tests.engine.conftest import perturbed, tiny_model
from tests.server.conftest import build_tokenizer


def test_every_variant_measures_every_prompt_at_batch_1() -> None:
    tokenizer = build_tokenizer()
    target_model = tiny_model("llama", seed=0)
    target = LoadedModel(target_model, tokenizer, "tiny", "-")
    draft = LoadedModel(perturbed(target_model, 0.1), tokenizer, "tiny-draft", "-")
    prompts = [Prompt("qa", "hello world hello world"), Prompt("rag", "say hello to the user")]
    results = measure_hf(list(HF_SYSTEMS), target, draft, prompts, max_tokens=5, warmup=1)
    assert [r.name for r in results] == list(HF_SYSTEMS)
    for result in results:
        assert result.kind == "in-process" and result.error is None
        (level,) = result.levels
        assert level.concurrency == 1 and (level.ok, level.failed) == (2, 0)
        assert 0 < level.output_tokens <= 10 and level.tokens_per_s > 0
        assert set(level.tasks) == {"qa", "rag"} and level.ttft_p50 is None


def test_assisted_without_a_draft_is_reported_not_raised() -> None:
    tokenizer = build_tokenizer()
    target = LoadedModel(tiny_model("llama", seed=0), tokenizer, "tiny", "-")
    results = measure_hf(["hf-plain", "hf-assisted"], target, None, [Prompt("qa", "hi")], 3)
    assert results[0].error is None and results[0].levels[0].ok == 1
    assert results[1].error is not None and results[1].levels == []
