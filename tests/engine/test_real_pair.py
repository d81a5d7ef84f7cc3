"""The default pair, end to end (marked ``real``: needs the model packages; run by CI)."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.loader import ModelNotFoundError, load_pair

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def pair():
    try:
        # fp32 so that target-only and speculative rounds see the same numerics: the claim
        # under test is the algorithm's, not the CPU bf16 kernels'.
        return load_pair(None, None, dtype="fp32", device="cpu", progress=False)
    except ModelNotFoundError as exc:
        pytest.skip(f"default pair not installed: {exc}")


def test_greedy_speculation_equals_target_only_on_the_real_pair(pair) -> None:
    target, draft = pair
    prompt = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that checks if a number is prime."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    params = SamplingParams(max_tokens=24, temperature=0)
    config = EngineConfig(gamma=4, max_slots=2, max_len=512)
    baseline = Engine(target.model, None, config, target.tokenizer).generate([prompt], params)[0]
    spec_engine = Engine(target.model, draft.model, config, target.tokenizer)
    speculative = spec_engine.generate([prompt], params)[0]
    assert len(baseline.token_ids) == 24
    assert speculative.token_ids == baseline.token_ids
    assert speculative.text == baseline.text
    # The 0.5B draft agrees with the 1.5B target most of the time on code.
    assert spec_engine.stats.acceptance_rate > 0.5
    assert speculative.stats.rounds < 24
