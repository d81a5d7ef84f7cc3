"""The engine on a CUDA device: run where one is lent (loadtest/device_check.sh), skipped elsewhere.

On CPU our kernels make verify and decode forwards bit-identical; on CUDA the library picks
kernels by shape, so greedy identity there is a claim these tests check rather than assume.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.synthetic import random_prompts, synthetic_pair
from engine.synthetic_bench import profile_kernels, run_level
from tests.engine.conftest import perturbed, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], list(range(40, 63)), [7]]


def on_cuda(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device="cuda", dtype=dtype)


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculation_is_target_only_on_cuda(
    dtype: torch.dtype, gamma: int, graphs: bool
) -> None:
    target = on_cuda(tiny_model("qwen2", seed=0), dtype)
    draft = on_cuda(perturbed(tiny_model("qwen2", seed=0), 0.1), dtype)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    config = EngineConfig(gamma=0, max_slots=4, max_len=128, cuda_graphs=graphs)
    baseline = Engine(target, None, config)
    speculative = Engine(target, draft, replace(config, gamma=gamma))
    expected = [c.token_ids for c in baseline.generate(PROMPTS, params)]
    got = [c.token_ids for c in speculative.generate(PROMPTS, params)]
    assert got == expected
    assert 0 < speculative.stats.accepted < speculative.stats.drafted
    assert speculative.proposer is not None
    for runner in (baseline.target, speculative.target, speculative.proposer.runner):
        if graphs:
            assert runner.graphs is not None and not runner.graphs.broken
            assert runner.graphs.replays > 0
        else:
            assert runner.graphs is None


def test_graphs_replay_what_eager_forwards_compute_on_cuda() -> None:
    """fp32: a graph launches the kernels the eager forward does, and the keys it attends past
    a row's length are masked (exact zeros), so outputs and acceptance equal the eager
    engine's, greedy and sampled (coupled and by rejection); a second pass over the same
    shapes captures nothing new."""
    target = on_cuda(tiny_model("qwen2", seed=0), torch.float32)
    draft = on_cuda(perturbed(tiny_model("qwen2", seed=0), 0.1), torch.float32)
    config = EngineConfig(gamma=4, max_slots=4, max_len=128)
    eager = Engine(target, draft, replace(config, cuda_graphs=False))
    graphed = Engine(target, draft, config)
    assert graphed.target.graphs is not None and graphed.proposer is not None
    for params in (
        SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=0.9, ignore_eos=True),
    ):
        seeds = [21, 22, 23, 24]  # the unseeded request's replay seeds, the same for both
        expected = [c.token_ids for c in eager.generate(PROMPTS, params, seeds=seeds)]
        got = [c.token_ids for c in graphed.generate(PROMPTS, params, seeds=seeds)]
        assert got == expected
    assert graphed.stats.accepted == eager.stats.accepted
    shapes = set(graphed.target.graphs.graphs) | set(graphed.proposer.runner.graphs.graphs)
    replays = graphed.target.graphs.replays
    graphed.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert graphed.target.graphs.replays > replays
    assert set(graphed.target.graphs.graphs) | set(graphed.proposer.runner.graphs.graphs) == shapes


def test_real_shapes_speculate_with_adaptive_gamma_on_cuda() -> None:
    pair = synthetic_pair("real", agreement=0.85, device="cuda", max_len=512)
    config = EngineConfig(gamma=6, max_slots=4, max_len=512, adaptive_gamma=True)
    engine = Engine(pair.target, pair.draft, config)
    assert engine.costs is not None  # calibrated on the device, with its synchronisation
    prompts = random_prompts(4, 200, pair.target.config.vocab_size, seed=1)
    result = run_level(engine, prompts, max_tokens=48)
    completions = engine.generate(prompts, SamplingParams(max_tokens=48, temperature=0))
    assert [c.token_ids for c in completions] == [pair.continuation(p[-1], 48) for p in prompts]
    assert result.tokens == 4 * 48
    per_round = profile_kernels(engine, prompts, max_tokens=48)
    assert per_round is not None
    # Kernels fill part of each round, never more than all of it.
    assert 0 < per_round < result.round_seconds / result.rounds * 1.5


def test_seeded_sampling_repeats_on_cuda() -> None:
    target = on_cuda(tiny_model("qwen2", seed=0), torch.bfloat16)
    draft = on_cuda(perturbed(tiny_model("qwen2", seed=0), 0.1), torch.bfloat16)
    engine = Engine(target, draft, EngineConfig(gamma=4, max_slots=4, max_len=128))
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    first = [c.token_ids for c in engine.generate(PROMPTS, params)]
    second = [c.token_ids for c in engine.generate(PROMPTS, params)]
    assert first == second
    assert engine.stats.drafted > 0


def test_a_round_waits_for_the_device_once() -> None:
    """Our code's only host sync in a round is the one transfer of its verdict: index tensors
    go over without a wait (engine/device.py), and the sampling steps are chosen on the host.
    Syncs inside transformers' modules are listed in the failure message, not counted."""
    target = on_cuda(tiny_model("qwen2", seed=0), torch.bfloat16)
    draft = on_cuda(perturbed(tiny_model("qwen2", seed=0), 0.1), torch.bfloat16)
    engine = Engine(target, draft, EngineConfig(gamma=4, max_slots=4, max_len=128))
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    # Each kind of round twice: the first pass captures the CUDA graphs of its shapes (a
    # capture synchronises, once per shape), the second is measured.
    for params, measured in ((greedy, False), (greedy, True), (sampled, False), (sampled, True)):
        ids = [engine.add_request(p, params) for p in PROMPTS[:3]]
        for _ in range(4):  # prefill, first tokens, then rounds that draft
            engine.step()
        ours = Path(__file__).parents[2] / "engine"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = [(Path(w.filename).name, w.lineno) for w in syncs]
        in_engine = [w for w in syncs if Path(w.filename).parent == ours]
        if measured:
            assert len(in_engine) == 1, where
            assert Path(in_engine[0].filename).name == "engine.py", where
        for request_id in ids:
            engine.abort(request_id)
        while engine.has_work():
            engine.step()
