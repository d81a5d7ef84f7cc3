from __future__ import annotations

import functools
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from engine import cpu_attention, cpu_linear
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine, PromptTooLongError
from engine.runner import RaggedBatch
from tests.engine.conftest import ARCHITECTURES, VOCAB, perturbed, tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], list(range(40, 63)), [7]]
NEW_TOKENS = 20
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@functools.cache
def models(arch: str):
    target = tiny_model(arch, seed=0)
    unrelated = tiny_model(arch, seed=1, layers=1, hidden=32)
    return target, unrelated


@functools.cache
def hf_greedy(arch: str, prompts: tuple[tuple[int, ...], ...] | None = None) -> list[list[int]]:
    target, _ = models(arch)
    result = []
    for prompt in PROMPTS if prompts is None else [list(p) for p in prompts]:
        out = target.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        result.append(out[0, len(prompt) :].tolist())
    return result


def engine(target, draft, gamma: int, max_slots: int = 4, max_len: int = 128) -> Engine:
    return Engine(target, draft, EngineConfig(gamma=gamma, max_slots=max_slots, max_len=max_len))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_only_matches_hf_generate(arch: str) -> None:
    target, _ = models(arch)
    results = engine(target, None, gamma=0).generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy(arch)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("draft_kind", ["same", "unrelated"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculation_is_token_identical(
    arch: str, gamma: int, draft_kind: str, batch: int
) -> None:
    target, unrelated = models(arch)
    draft = target if draft_kind == "same" else unrelated
    eng = engine(target, draft, gamma)
    prompts = PROMPTS[:batch]
    results = eng.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy(arch)[:batch]
    assert eng.stats.drafted > 0
    if draft_kind == "same":
        assert eng.stats.acceptance_rate == 1.0
        assert eng.stats.rejections == 0
    else:
        assert eng.stats.acceptance_rate < 0.2
        assert eng.stats.rejections > 0


def test_partial_acceptance_with_mixed_row_gammas() -> None:
    target, _ = models("qwen2")
    eng = engine(target, perturbed(target, 0.1), gamma=5)
    params = [
        SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, gamma=g)
        for g in (5, 2, 0, 3)
    ]
    results = eng.generate(PROMPTS, params)
    assert [r.token_ids for r in results] == hf_greedy("qwen2")
    assert 0.2 < eng.stats.acceptance_rate < 0.95
    assert results[2].stats.drafted == 0
    assert all(
        len(r.stats.acceptance_histogram) == p.gamma + 1
        for r, p in zip(results, params, strict=True)
    )


def _fresh_cache(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ref = engine(model, None, gamma=0, max_slots=1)
    ref.target.forward(RaggedBatch([tokens], [0], [0], [len(tokens)]), output="none")
    cache = ref.target.cache
    return [
        (cache.slot_keys(i, 0, len(tokens)), cache.slot_values(i, 0, len(tokens)))
        for i in range(len(cache.keys))
    ]


def _assert_slot_holds(
    runner, slot: int, length: int, reference: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """The slot's first ``length`` K/V positions equal ``reference`` (from ``_fresh_cache``)."""
    for layer, (ref_k, ref_v) in enumerate(reference):
        torch.testing.assert_close(runner.cache.slot_keys(layer, slot, length), ref_k)
        torch.testing.assert_close(runner.cache.slot_values(layer, slot, length), ref_v)


def test_rollback_leaves_caches_as_if_rejected_tokens_never_came() -> None:
    target, _ = models("llama")
    draft = perturbed(target, 0.15)
    eng = engine(target, draft, gamma=6, max_slots=2)
    eng.add_request(PROMPTS[2], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    rejected_rounds = 0
    while eng.has_work() and rejected_rounds < 3:
        before = eng.stats.drafted - eng.stats.accepted
        eng.step()
        request = next(iter(eng.scheduler.running.values()), None)
        if request is None or eng.stats.drafted - eng.stats.accepted == before:
            continue
        rejected_rounds += 1
        tokens = request.token_ids
        for runner, length in ((eng.target, request.target_len), (eng.proposer.runner, None)):
            length = request.draft_len if length is None else length
            assert length <= len(tokens) - 1
            reference = _fresh_cache(runner.model, tokens[:length])
            for layer, (ref_k, ref_v) in enumerate(reference):
                torch.testing.assert_close(
                    runner.cache.slot_keys(layer, request.slot, length), ref_k
                )
                torch.testing.assert_close(
                    runner.cache.slot_values(layer, request.slot, length), ref_v
                )
    assert rejected_rounds == 3


def test_finished_slot_serves_a_new_request_without_leaking() -> None:
    target, unrelated = models("gpt2")
    eng = engine(target, unrelated, gamma=3, max_slots=1)
    # A long first request fills the slot deep; the second must not see any of it.
    first = eng.generate(
        [PROMPTS[2]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    )
    second = eng.generate([PROMPTS[1]], GREEDY)
    assert first[0].finish_reason == "length"
    assert second[0].token_ids == hf_greedy("gpt2")[1]
    assert eng.scheduler.num_free_slots == 1


def test_more_requests_than_slots_queue_and_all_finish() -> None:
    target, unrelated = models("qwen3")
    eng = engine(target, unrelated, gamma=2, max_slots=2)
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy("qwen3")


def test_abort_frees_the_slot_and_reports_abort() -> None:
    target, unrelated = models("qwen2")
    eng = engine(target, unrelated, gamma=2, max_slots=1)
    running = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0))
    waiting = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0))
    eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 1
    eng.abort(running)
    eng.abort(waiting)
    outputs = {o.request_id: o for o in eng.step()}
    assert outputs[running].finish_reason == "abort" and outputs[running].finished
    assert outputs[waiting].finish_reason == "abort"
    assert eng.scheduler.num_free_slots == 1 and not eng.has_work()


def test_max_tokens_and_context_limit_end_with_length() -> None:
    target, unrelated = models("opt")
    eng = engine(target, target, gamma=4, max_len=40)
    short = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(short[0].token_ids) == 5 and short[0].finish_reason == "length"
    (long,) = eng.generate(
        [PROMPTS[2]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    )
    assert len(PROMPTS[2]) + len(long.token_ids) == 40 and long.finish_reason == "length"


def test_learned_position_models_clamp_max_len() -> None:
    target, _ = models("gpt2")  # 256 learned positions
    eng = engine(target, target, gamma=4, max_len=4096)
    assert eng.max_len <= 256 - 4


def test_too_long_prompt_is_refused_before_taking_a_slot() -> None:
    target, _ = models("llama")
    eng = engine(target, None, gamma=0, max_len=16)
    with pytest.raises(PromptTooLongError, match="16"):
        eng.add_request(list(range(3, 19)), GREEDY)
    assert not eng.has_work() and eng.scheduler.num_free_slots == 4
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([10_000], GREEDY)


def test_eos_stops_with_reason_stop() -> None:
    target, unrelated = models("llama")
    expected = hf_greedy("llama")[0]
    eos = expected[6]
    target.generation_config.eos_token_id = eos
    try:
        eng = engine(target, unrelated, gamma=3)
        (result,) = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    finally:
        target.generation_config.eos_token_id = 2
    cut = expected.index(eos)
    assert result.token_ids == expected[: cut + 1]
    assert result.finish_reason == "stop"


def test_stop_token_ids_stop_generation() -> None:
    target, _ = models("gpt_neox")
    expected = hf_greedy("gpt_neox")[1]
    params = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, stop_token_ids=[expected[4]]
    )
    (result,) = engine(target, target, gamma=8).generate([PROMPTS[1]], params)
    assert result.token_ids == expected[: expected.index(expected[4]) + 1]
    assert result.finish_reason == "stop"


def test_stop_strings_cut_text_and_tokens(tokenizer) -> None:
    target, _ = models("qwen2")
    eng = Engine(target, target, EngineConfig(gamma=8, max_slots=2, max_len=128), tokenizer)
    full = eng.generate(["hello"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 10
    # A stop string that spans several tokens, all accepted in one round (draft == target).
    stop = text[4:9]
    (cut,) = eng.generate(
        ["hello"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    )
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text
    assert len(cut.token_ids) < len(full.token_ids)
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids)
    assert stop not in tokenizer.decode(cut.token_ids[:-1])


def test_stats_are_consistent() -> None:
    target, _ = models("qwen2")
    eng = engine(target, perturbed(target, 0.1), gamma=4)
    results = eng.generate(PROMPTS, GREEDY)
    for r in results:
        s = r.stats
        assert sum(s.acceptance_histogram) <= s.rounds
        assert sum(k * c for k, c in enumerate(s.acceptance_histogram)) == s.accepted
        assert s.accepted + s.rounds == len(r.token_ids)
        assert s.first_token_time is not None and s.finish_time >= s.first_token_time
        assert s.generated == len(r.token_ids) and s.tokens_per_second > 0
    assert eng.stats.accepted == sum(r.stats.accepted for r in results)
    assert eng.stats.generated_tokens == len(PROMPTS) * NEW_TOKENS
    assert eng.stats.mean_accepted_per_round > 1.0 and eng.stats.tokens_per_second > 0


def test_logprobs_match_target_distribution() -> None:
    target, unrelated = models("llama")
    eng = engine(target, unrelated, gamma=3)
    params = SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    (result,) = eng.generate([PROMPTS[0]], params)
    sequence = PROMPTS[0] + result.token_ids
    with torch.no_grad():
        reference = target(torch.tensor([sequence])).logits[0].log_softmax(-1)
    assert len(result.logprobs) == 6
    for offset, lp in enumerate(result.logprobs):
        position = len(PROMPTS[0]) - 1 + offset
        assert lp.token_id == sequence[position + 1]
        assert lp.logprob == pytest.approx(reference[position, lp.token_id].item(), abs=1e-4)
        assert len(lp.top) == 3 and max(lp.top.values()) == pytest.approx(lp.logprob, abs=1e-4)
    prompt_lps = result.prompt_logprobs
    assert len(prompt_lps) == len(PROMPTS[0]) and prompt_lps[0] is None
    for position, lp in enumerate(prompt_lps[1:]):
        assert lp.token_id == sequence[position + 1] and len(lp.top) == 2
        assert lp.logprob == pytest.approx(reference[position, lp.token_id].item(), abs=1e-4)


def test_restricted_draft_vocabulary_stays_lossless() -> None:
    target, _ = models("llama")
    config = EngineConfig(gamma=4, max_slots=4, max_len=128, draft_vocab=100)
    eng = Engine(target, perturbed(target, 0.05), config)
    proposed: list[torch.Tensor] = []
    propose = eng.proposer.propose

    def recording_propose(*args):
        tokens, probs = propose(*args)
        proposed.append(tokens)
        return tokens, probs

    eng.proposer.propose = recording_propose
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy("llama")
    drafted = set(torch.cat([p.flatten() for p in proposed]).tolist())
    # Proposable: the first 100 ids, the specials and the tokens of the rows' contexts.
    context = {t for prompt, r in zip(PROMPTS, results, strict=True) for t in prompt + r.token_ids}
    assert drafted <= set(range(100)) | eng.special_ids | context
    assert any(t >= 100 for t in drafted)  # a context's rare tokens did come up
    assert eng.stats.accepted > 0


@pytest.mark.skipif(not cpu_linear.available(), reason="CPU bf16 kernel not available here")
@pytest.mark.parametrize("weights", ["int4", "int8", "bf16"])
def test_restricted_draft_head_streams_the_drafts_weights(weights: str) -> None:
    import copy

    base, _ = models("qwen2")
    target = copy.deepcopy(base).to(torch.bfloat16)
    draft = perturbed(base, 0.1).to(torch.bfloat16)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    only = engine(target, None, gamma=0).generate(PROMPTS, params)
    config = EngineConfig(gamma=4, max_slots=4, max_len=128, draft_vocab=200, draft_weights=weights)
    eng = Engine(target, draft, config)
    # A bf16 head over a subset would cost what the whole int4 head does: it would save nothing.
    expected = {"int4": cpu_linear.Int4Linear, "int8": cpu_linear.Int8Linear}
    head_type = expected.get(weights, cpu_linear.FastLinear)
    assert type(draft.get_output_embeddings()) is head_type
    assert type(eng.proposer.subset_head) is head_type
    assert eng.proposer.subset_head.out_features < VOCAB
    spec = eng.generate(PROMPTS, params)
    assert [r.token_ids for r in spec] == [r.token_ids for r in only]
    assert eng.stats.accepted > 0


@pytest.mark.skipif(not cpu_linear.available(), reason="CPU bf16 kernel not available here")
def test_bf16_cpu_kernels_keep_speculation_token_identical() -> None:
    import copy

    base, _ = models("qwen2")
    target = copy.deepcopy(base).to(torch.bfloat16)
    draft = perturbed(base, 0.1).to(torch.bfloat16)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    only = engine(target, None, gamma=0).generate(PROMPTS, params)
    assert isinstance(target.get_output_embeddings(), cpu_linear.FastLinear)
    assert target.config._attn_implementation == cpu_attention.NAME
    spec_engine = engine(target, draft, gamma=5)
    # The draft decodes from int4 weights (the default); the target's are exact.
    assert isinstance(draft.get_output_embeddings(), cpu_linear.Int4Linear)
    assert type(target.get_output_embeddings()) is cpu_linear.FastLinear
    assert spec_engine.target.prefill_attention == "sdpa"  # prompts go through fast SDPA
    spec = spec_engine.generate(PROMPTS, params)
    # and decoding is back on the batch-invariant kernel
    assert target.config._attn_implementation == cpu_attention.NAME
    assert [r.token_ids for r in spec] == [r.token_ids for r in only]
    assert 0 < spec_engine.stats.acceptance_rate < 1


@pytest.mark.skipif(not cpu_linear.available(), reason="CPU bf16 kernel not available here")
@pytest.mark.parametrize("tune", [False, True])
def test_prompt_gemm_is_tuned_on_the_targets_largest_layer(
    tune: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    base, _ = models("qwen2")
    target = copy.deepcopy(base).to(torch.bfloat16)
    probes: list[torch.Tensor] = []
    monkeypatch.setattr(cpu_linear, "tune_prompt_gemm", probes.append)
    Engine(target, None, EngineConfig(gamma=0, max_slots=1, max_len=64, tune_prompt_gemm=tune))
    if not tune:
        assert probes == []
        return
    (probe,) = probes
    below_limit = [
        m.weight.numel()
        for m in target.modules()
        if isinstance(m, torch.nn.Linear)
        and m.weight.numel() <= cpu_linear.PROMPT_GEMM_MAX_WEIGHT // 2
    ]
    assert probe.dtype == torch.bfloat16 and probe.numel() == max(below_limit)
    # The LM head is a linear too; a real one (hundreds of MB) is never timed.
    monkeypatch.setattr(cpu_linear, "PROMPT_GEMM_MAX_WEIGHT", 2 * (probe.numel() - 1))
    Engine(target, None, EngineConfig(gamma=0, max_slots=1, max_len=64, tune_prompt_gemm=True))
    assert probes[-1].numel() < probe.numel()


def test_draft_catches_up_lazily_with_a_cache_as_if_it_had_followed_along() -> None:
    from engine.gamma import CostModel

    target, _ = models("llama")
    draft = perturbed(target, 0.05)
    config = EngineConfig(gamma=4, max_slots=2, max_len=128, draft_window=6, prompt_lookup=0)
    eng = Engine(target, draft, config)
    # First drafting cannot pay, so rows decode plainly and their draft slots stay empty...
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 1.0})
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in (PROMPTS[2], PROMPTS[1])]
    for _ in range(5):
        eng.step()
    rows = [eng.scheduler.find(i) for i in ids]
    assert all(r.draft_len == 0 for r in rows)
    # (The shorter prompt started a step earlier.)
    generated = [len(r.output_token_ids) for r in rows]
    assert generated == [4, 5]
    # ... then it becomes cheap: both rows catch up (prompt window plus what they generated,
    # lengths differ) before their first draft step.
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 0.01})
    rounds = []
    eng.on_round = rounds.append
    eng.step()
    assert rounds[-1].gamma > 0
    runner = eng.proposer.runner
    for request, before in zip(rows, generated, strict=True):
        assert request.draft_gap == len(request.prompt_token_ids) + before - 1 - 6
        window = request.token_ids[request.draft_gap : request.draft_gap + request.draft_len]
        assert request.draft_len >= 6
        _assert_slot_holds(runner, request.slot, request.draft_len, _fresh_cache(draft, window))
    while eng.has_work():
        eng.step()
    assert eng.stats.accepted > 0
    want = hf_greedy("llama", (tuple(PROMPTS[2]), tuple(PROMPTS[1])))
    assert [r.output_token_ids for r in rows] == want


def test_a_new_row_drafts_only_if_its_tokens_can_repay_the_draft_prefill() -> None:
    from engine.gamma import CostModel

    target, _ = models("llama")
    config = EngineConfig(gamma=4, max_slots=2, max_len=128, prompt_lookup=0)
    eng = Engine(target, perturbed(target, 0.05), config)
    draft_forwards = []
    forward = eng.proposer.runner.forward
    eng.proposer.runner.forward = lambda *a, **k: draft_forwards.append(1) or forward(*a, **k)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    # Drafting pays per round, but copying the prompt into the draft would cost more than
    # drafting could save over 20 tokens: plain decoding, and the draft never runs.
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 0.1}, draft_catch_up={1: 1.0})
    (result,) = eng.generate([PROMPTS[2]], params)
    assert result.token_ids == hf_greedy("llama")[2]
    assert draft_forwards == [] and eng.stats.drafted == 0
    # Prompt lookup still serves such a row: it needs no catch-up.
    lookup = Engine(target, perturbed(target, 0.05), replace(config, prompt_lookup=3))
    lookup.costs = replace(eng.costs, draft_catch_up={1: 5.0})  # its prompt is shorter
    repeating = [5, 6, 7, 8, 9, 5, 6, 7]
    (result,) = lookup.generate([repeating], params)
    assert result.token_ids == hf_greedy("llama", (tuple(repeating),))[0]
    assert lookup.stats.ngram_drafted > 0 and lookup.stats.drafted == lookup.stats.ngram_drafted
    # A cheap copy: the same request drafts.
    eng.costs.draft_catch_up = {1: 0.001}
    (result,) = eng.generate([PROMPTS[2]], params)
    assert result.token_ids == hf_greedy("llama")[2]
    assert draft_forwards and eng.stats.drafted > 0


def _catch_up_judging_engine(target, draft, config: EngineConfig) -> tuple[Engine, list]:
    """An engine whose draft prefill is repaid by 20 tokens of drafting for one row, not for
    four rows' prompts at once, and the list its rounds are recorded in."""
    from engine.gamma import CostModel

    eng = Engine(target, draft, config)
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 0.1}, draft_catch_up={1: 0.2})
    rounds: list = []
    eng.on_round = rounds.append
    return eng, rounds


def test_rows_alike_share_one_catch_up_pricing_per_round(monkeypatch) -> None:
    """New rows with the prior's alpha are judged once a round, not once each: pricing each
    was a choose_gamma over the whole batch per row, quadratic in the batch (3 ms a round at
    32 rows), paid even in rounds that end up not drafting."""
    from engine import gamma
    from engine.gamma import CostModel

    target, _ = models("llama")
    config = EngineConfig(gamma=4, max_slots=4, max_len=128, prompt_lookup=0)
    eng = Engine(target, perturbed(target, 0.05), config)
    # Catch-ups never pay here, so the rows stay new (and alike) round after round.
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 0.1}, draft_catch_up={1: 1.0})
    pricings = []
    original = gamma.choose_gamma

    def counted(*args, **kwargs):
        pricings.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(gamma, "choose_gamma", counted)  # what catch-up pricing runs
    rounds: list = []
    eng.on_round = rounds.append
    results = eng.generate([PROMPTS[2]] * 4, GREEDY)
    assert [r.token_ids for r in results] == [hf_greedy("llama")[2]] * 4
    assert eng.stats.drafted == 0
    full_rounds = [r for r in rounds if r.batch_size == 4]
    assert len(full_rounds) >= NEW_TOKENS - 2
    # At most one pricing per round (none in a row's first round, which never drafts), each
    # of the whole batch.
    assert 0 < len(pricings) <= len(rounds)
    assert set(pricings) <= {1, 2, 3, 4}


def test_a_new_row_judges_the_draft_prefill_at_the_batch_the_queue_will_make() -> None:
    target, _ = models("llama")
    draft = perturbed(target, 0.05)
    # One admission per step, so the first round runs one row while the others still queue.
    config = EngineConfig(gamma=6, max_slots=4, max_len=128, prompt_lookup=0, prefill_budget=1)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    first_gammas = []
    for queued in (0, 3):
        eng, rounds = _catch_up_judging_engine(target, draft, config)
        for _ in range(1 + queued):
            eng.add_request(PROMPTS[2], params)
        eng.step()
        # A row's first round only samples its first token; it may draft from the second,
        # which also admits the next queued request.
        assert rounds[0].batch_size == 1 and rounds[0].gamma == 0
        eng.step()
        assert rounds[1].batch_size == 1 + min(queued, 1)
        first_gammas.append(rounds[1].gamma)
    assert first_gammas[0] > 0 and first_gammas[1] == 0


def test_rows_still_prefilling_count_towards_the_coming_batch() -> None:
    """Requests whose prompts are being prefilled in chunks join the batch within a few steps:
    a running row's draft prefill is judged at that batch, as for queued requests."""
    target, _ = models("llama")
    draft = perturbed(target, 0.05)
    config = EngineConfig(gamma=6, max_slots=4, max_len=128, prompt_lookup=0, prefill_budget=0,
                          prefill_chunk=4)  # fmt: skip
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    second_gammas = []
    for prefilling in (0, 3):
        eng, rounds = _catch_up_judging_engine(target, draft, config)
        eng.add_request(PROMPTS[2], params)
        while not eng.step():  # its prompt in chunks, then a first round: its first token
            pass
        for _ in range(prefilling):
            eng.add_request(list(range(40, 100)), params)
        eng.step()  # admits them; 4 of their prompt tokens go in; the first row's second round
        assert len(eng._prefilling) == prefilling and rounds[1].batch_size == 1
        second_gammas.append(rounds[1].gamma)
    assert second_gammas[0] > 0 and second_gammas[1] == 0


def test_draft_context_window_stays_lossless_and_caches_only_the_window() -> None:
    target, _ = models("llama")
    draft = perturbed(target, 0.05)
    config = EngineConfig(gamma=4, max_slots=4, max_len=128, draft_window=5)
    eng = Engine(target, draft, config)
    eng.add_request(PROMPTS[2], GREEDY, request_id="long")
    eng.step()
    request = eng.scheduler.find("long")
    assert request.draft_len == 0  # the first round only sampled the first token
    eng.step()
    # The window ends at the row's present when it first drafts: prompt + 1 token, less the
    # pending last one.
    assert request.draft_gap == len(PROMPTS[2]) + 1 - 1 - 5
    window = request.token_ids[request.draft_gap : request.draft_gap + request.draft_len]
    reference = _fresh_cache(draft, window)
    runner = eng.proposer.runner
    for layer, (ref_k, _) in enumerate(reference):
        torch.testing.assert_close(
            runner.cache.slot_keys(layer, request.slot, request.draft_len), ref_k
        )
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy("llama")
    assert eng.stats.accepted > 0


def test_draft_window_with_a_head_caches_the_head_then_the_window_as_one_sequence() -> None:
    target, _ = models("llama")
    draft = perturbed(target, 0.05)
    head, window = 3, 8
    config = EngineConfig(
        gamma=4, max_slots=4, max_len=128, draft_window=window, draft_head=head, prompt_lookup=0
    )
    eng = Engine(target, draft, config)
    eng.add_request(PROMPTS[2], GREEDY, request_id="long")
    eng.step()
    eng.step()
    request = eng.scheduler.find("long")
    ids = request.token_ids
    # Prompt + 1 token, less the pending last one: the head, a gap, the rest of the window.
    assert request.draft_gap == len(PROMPTS[2]) + 1 - 1 - window
    assert request.draft_len > window
    # The slot holds what a fresh prefill of head + window (at positions 0, 1, ...) gives,
    # and every later token follows on at its position less the gap.
    seen = ids[:head] + ids[head + request.draft_gap : request.draft_gap + request.draft_len]
    _assert_slot_holds(
        eng.proposer.runner, request.slot, request.draft_len, _fresh_cache(draft, seen)
    )
    while eng.has_work():
        eng.step()
    assert request.output_token_ids == hf_greedy("llama", (tuple(PROMPTS[2]),))[0]
    assert eng.stats.accepted > 0
    # Rows too short for a gap keep their whole context, whatever the head.
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy("llama")


def test_draft_head_must_lie_within_the_window() -> None:
    with pytest.raises(ValueError, match="draft_head"):
        EngineConfig(draft_head=-1)
    with pytest.raises(ValueError, match="below draft_window"):
        EngineConfig(draft_window=8, draft_head=8)
    assert EngineConfig(draft_window=0, draft_head=8).draft_head == 8  # whole context: moot


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("with_draft", [False, True], ids=["lookup-only", "lookup-and-draft"])
def test_prompt_lookup_greedy_matches_hf_generate(arch: str, with_draft: bool) -> None:
    target, unrelated = models(arch)
    config = EngineConfig(
        gamma=4, max_slots=4, max_len=128, prompt_lookup=3, adaptive_gamma=with_draft
    )
    eng = Engine(target, unrelated if with_draft else None, config)
    if with_draft:
        from engine.gamma import CostModel

        # Fixed costs (a flat verify, draft steps that cost): a tiny model's calibrated ones
        # are timing noise, and on a loaded CI box they once made every copied token look dear.
        eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 0.5})
    # The first prompt ends with an n-gram it contains earlier, so the lookup fires at once.
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7], *PROMPTS]
    results = eng.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == hf_greedy(arch, tuple(map(tuple, prompts)))
    assert eng.stats.ngram_drafted > 0
    if not with_draft:
        assert eng.stats.drafted == eng.stats.ngram_drafted


def test_per_request_proposer_choice() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=4, max_len=128, prompt_lookup=3)
    rounds = []
    eng = Engine(target, perturbed(target, 0.05), config)
    eng.on_round = rounds.append
    by_draft = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, proposer="draft")
    by_lookup = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, proposer="ngram")
    prompt = [5, 6, 7, 8, 9, 5, 6, 7]  # the lookup has a match from the first round
    want = hf_greedy("qwen2", (tuple(prompt),))[0]
    sources = {}
    for params in (by_draft, by_lookup):
        rounds.clear()
        (result,) = eng.generate([prompt], params)
        assert result.token_ids == want
        sources[params.proposer] = {r.ngram[0] for r in rounds if r.drafted[0]}
    assert sources == {"draft": {False}, "ngram": {True}}
    with pytest.raises(ValueError, match="proposer"):
        SamplingParams(proposer="magic")


@pytest.mark.parametrize("with_draft", [False, True], ids=["lookup-only", "lookup-and-draft"])
def test_a_predicted_output_is_copied_and_verified(with_draft: bool) -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=4, max_slots=2, max_len=128, prompt_lookup=3)
    eng = Engine(target, unrelated if with_draft else None, config)
    prompt = PROMPTS[2]
    want = hf_greedy("qwen2", (tuple(prompt),))[0]
    rounds: list = []
    eng.on_round = rounds.append
    (exact,) = eng.generate([prompt], replace(GREEDY, prediction=want))
    assert exact.token_ids == want
    # The prediction is the output: its copies are all kept, a few rounds carry everything.
    assert exact.stats.prediction_accepted >= NEW_TOKENS - 5
    assert exact.stats.prediction_rejected <= 1 and len(rounds) <= 6
    # A prediction that is partly wrong (an edit in the middle) changes nothing but speed.
    edited = want[:8] + [(t + 1) % VOCAB for t in want[8:12]] + want[12:]
    (result,) = eng.generate([prompt], replace(GREEDY, prediction=edited))
    assert result.token_ids == want
    assert result.stats.prediction_rejected > 0 and result.stats.prediction_accepted > 8
    with pytest.raises(ValueError, match="prediction token ids"):
        eng.add_request(prompt, replace(GREEDY, prediction=[VOCAB]))


def test_draft_weights_are_validated() -> None:
    assert EngineConfig().draft_weights == "int4"
    for kind in ("bf16", "int8", "int4"):
        assert EngineConfig(draft_weights=kind).draft_weights == kind
    with pytest.raises(ValueError, match="draft_weights must be one of bf16, int8, int4"):
        EngineConfig(draft_weights="int2")


def test_adaptive_gamma_probes_a_row_it_stopped_drafting() -> None:
    from engine.gamma import PROBE_EVERY, CostModel

    target, unrelated = models("llama")
    config = EngineConfig(gamma=4, max_slots=1, max_len=128, adaptive_gamma=True)
    eng = Engine(target, unrelated, config)
    # A draft step half as dear as a verify: drafting pays only with high acceptance.
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 0.5})
    rounds = []
    eng.on_round = rounds.append
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    (result,) = eng.generate([PROMPTS[0]], params)
    assert result.token_ids[:NEW_TOKENS] == hf_greedy("llama")[0]
    gammas = [r.gamma for r in rounds]
    assert 0 in gammas
    first_idle = gammas.index(0)
    # Never more than PROBE_EVERY rounds in a row without a draft after the estimate collapsed.
    idle = 0
    for gamma in gammas[first_idle:]:
        idle = idle + 1 if gamma == 0 else 0
        assert idle <= PROBE_EVERY
    assert any(g > 0 for g in gammas[first_idle:])


def test_adaptive_gamma_neither_drafts_nor_probes_where_drafting_cannot_pay() -> None:
    from engine.gamma import PROBE_ALPHA, CostModel, choose_gamma

    target, draft = models("llama")
    config = EngineConfig(gamma=4, max_slots=1, max_len=128, adaptive_gamma=True)
    eng = Engine(target, draft, config)
    # A draft step as dear as a verify: not even a good draft's acceptance would pay.
    eng.costs = CostModel(target={1: 1.0, 64: 1.0}, draft={1: 1.0})
    assert choose_gamma([PROBE_ALPHA], [4], 4, eng.costs) == 0
    assert eng.proposer is not None
    draft_forwards = []
    forward = eng.proposer.runner.forward
    eng.proposer.runner.forward = lambda *a, **k: draft_forwards.append(1) or forward(*a, **k)
    rounds = []
    eng.on_round = rounds.append
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    (result,) = eng.generate([PROMPTS[0]], params)
    assert result.token_ids[:NEW_TOKENS] == hf_greedy("llama")[0]
    assert len(rounds) == 40 and all(r.gamma == 0 for r in rounds)
    # Nor did the draft model run at all: not even its copy of the prompt was computed.
    assert draft_forwards == []


def test_padding_groups_keep_waste_small() -> None:
    from engine.engine import padding_groups

    rows = [SimpleNamespace(n=n) for n in (800, 60, 70, 790, 65, 5)]
    groups = padding_groups(rows, lambda r: r.n)
    assert [[r.n for r in g] for g in groups] == [[800, 790], [70, 65, 60], [5]]
    for group in groups:
        assert max(r.n for r in group) * len(group) <= 1.25 * sum(r.n for r in group)


def test_prefill_budget_interleaves_admission_with_decoding() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=4, max_len=128, prefill_budget=5)
    eng = Engine(target, unrelated, config)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    first = eng.step()
    # PROMPTS[0] alone fills the budget: it decodes while the others still wait.
    assert [o.request_id for o in first] == [ids[0]] and first[0].new_token_ids
    assert eng.num_running == 1 and eng.num_waiting == 3
    results = {i: [] for i in ids}
    for out in first:
        results[out.request_id] += out.new_token_ids
    while eng.has_work():
        for out in eng.step():
            results[out.request_id] += out.new_token_ids
    assert [results[i] for i in ids] == hf_greedy("qwen2")


@pytest.mark.parametrize("draft_kind", ["none", "unrelated"])
def test_a_follow_up_turn_computes_only_what_its_slot_does_not_hold(draft_kind: str) -> None:
    target, unrelated = models("qwen2")
    draft = None if draft_kind == "none" else unrelated
    gamma = 0 if draft is None else 3
    config = EngineConfig(gamma=gamma, max_slots=2, max_len=128, prompt_lookup=0)
    cached = Engine(target, draft, config)
    fresh = Engine(target, draft, replace(config, prefix_cache=False))
    computed: list[int] = []
    prefill = cached.target.prefill
    cached.target.prefill = lambda batch, output="none": (  # type: ignore[method-assign]
        computed.extend(batch.num_new) or prefill(batch, output)
    )
    first_prompt = PROMPTS[2]
    (first,) = cached.generate([first_prompt], GREEDY)
    assert first.stats.cached_tokens == 0 and computed == [len(first_prompt) - 1]
    # The next turn: the whole conversation so far, then a new message.
    follow_up = first_prompt + first.token_ids + [30, 31, 32]
    computed.clear()
    (second,) = cached.generate([follow_up], GREEDY)
    held = len(first_prompt) + NEW_TOKENS - 1  # the last output token was never fed
    assert second.stats.cached_tokens == held
    assert computed == [len(follow_up) - 1 - held]
    fresh.generate([first_prompt], GREEDY)
    (want,) = fresh.generate([follow_up], GREEDY)
    assert want.stats.cached_tokens == 0
    assert second.token_ids == want.token_ids
    # The reused K/V is what computing the conversation afresh writes.
    slot, length = 0, len(follow_up) - 1
    for layer in range(len(cached.target.cache.keys)):
        torch.testing.assert_close(
            cached.target.cache.slot_keys(layer, slot, length),
            fresh.target.cache.slot_keys(layer, slot, length),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_choices_of_one_prompt_compute_it_once(prefix_cache: bool) -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=3, max_len=128, prefix_cache=prefix_cache)
    eng = Engine(target, unrelated, config)
    computed = record_prefills(eng)
    prompt = PROMPTS[2]
    results = eng.generate([prompt] * 3, GREEDY)  # n = 3, as the server sends them
    assert [r.token_ids for r in results] == hf_greedy("qwen2")[2:3] * 3
    held = len(prompt) - 1
    if not prefix_cache:
        assert computed == [[held] * 3]
        return
    assert computed == [[held]]
    assert [r.stats.cached_tokens for r in results] == [0, held, held]
    # The copies are the computed slot's K/V bit for bit.
    cache = eng.target.cache
    for layer in range(len(cache.keys)):
        for slot in (1, 2):
            assert torch.equal(cache.slot_keys(layer, slot, held), cache.slot_keys(layer, 0, held))
            assert torch.equal(
                cache.slot_values(layer, slot, held), cache.slot_values(layer, 0, held)
            )


def test_a_prompt_copies_the_document_a_running_request_holds() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=2, max_len=128, prompt_lookup=0)
    eng = Engine(target, unrelated, config)
    computed = record_prefills(eng)
    document = list(range(40, 70))
    first_prompt, second_prompt = document + [5, 6], document + [7, 8, 9]
    first = eng.add_request(first_prompt, GREEDY)
    results = {first: [], "second": []}
    for _ in range(3):  # prefilled, then decoding
        for out in eng.step():
            results[out.request_id] += out.new_token_ids
    assert computed == [[len(first_prompt) - 1]] and results[first]
    second = eng.add_request(second_prompt, GREEDY)
    results[second] = []
    finished = {}
    while eng.has_work():
        for out in eng.step():
            results[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out.stats
    # Only the new question is computed (its last token goes to its first round).
    assert computed[1:] == [[2]]
    assert finished[second].cached_tokens == len(document)
    expected = hf_greedy("qwen2", (tuple(first_prompt), tuple(second_prompt)))
    assert [results[first], results[second]] == expected


def test_a_prompt_waits_for_the_chunks_of_one_it_shares_most_of() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=3, max_len=128, prefill_chunk=16)
    eng = Engine(target, unrelated, config)
    computed = record_prefills(eng)
    document = list(range(3, 43))  # 40 tokens
    prompts = [document + [50], document + [51, 52, 53], [60, 61, 62, 63]]
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    results: dict[str, list[int]] = {i: [] for i in ids}
    while eng.has_work():
        for out in eng.step():
            results[out.request_id] += out.new_token_ids
    # The unrelated short prompt first; then the document once, in chunks, for both; then
    # only the second question's own tokens.
    assert computed == [[3], [14], [13], [13], [2]]
    assert [results[i] for i in ids] == hf_greedy("qwen2", tuple(tuple(p) for p in prompts))


def record_prefills(eng: Engine) -> list[list[int]]:
    """Makes the engine's target note the tokens per row of every prompt forward."""
    computed: list[list[int]] = []
    prefill = eng.target.prefill

    def recorded(batch: RaggedBatch, output: str = "none") -> torch.Tensor | None:
        computed.append(list(batch.num_new))
        return prefill(batch, output)

    eng.target.prefill = recorded  # type: ignore[method-assign]
    return computed


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_rounds() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=4, max_len=128, prefill_chunk=5)
    eng = Engine(target, unrelated, config)
    computed = record_prefills(eng)
    short = eng.add_request(PROMPTS[0], GREEDY)
    assert eng.step() == []
    first = eng.step()
    # Nothing else decodes, yet the prompt goes in chunks too (another may arrive meanwhile).
    assert computed == [[3], [3]] and [o.request_id for o in first] == [short]
    long = eng.add_request(PROMPTS[2], GREEDY)  # 22 tokens to compute beside a decoding row
    results = {short: first[0].new_token_ids, long: []}
    short_rounds_while_prefilling = 0
    while eng.has_work():
        outputs = eng.step()
        for out in outputs:
            results[out.request_id] += out.new_token_ids
        if not results[long] and any(o.request_id == short for o in outputs):
            short_rounds_while_prefilling += 1
    # At most 5 a step, in even parts rather than full chunks and a sliver.
    assert computed[2:7] == [[5], [5], [4], [4], [4]]
    # The running row went on decoding a round per chunk instead of waiting out the prompt.
    assert short_rounds_while_prefilling >= 4
    want = hf_greedy("qwen2")
    assert results[short] == want[0] and results[long] == want[2]


def test_a_slow_prompt_pace_makes_chunks_smaller_than_the_token_chunk() -> None:
    target, unrelated = models("qwen2")
    long_prompt = list(range(3, 83))  # 79 tokens to compute beside a decoding row
    results, chunks = [], []
    for seconds in (0.0, 1.0):
        config = EngineConfig(
            gamma=3, max_slots=2, max_len=128, prefill_chunk=64, prefill_chunk_seconds=seconds
        )
        eng = Engine(target, unrelated, config)
        # As timed on a machine where 32 prompt tokens take a second (a tiny model's real
        # pace would allow the whole token chunk).
        eng.prefill_pace.seconds_per_token = 1 / 32
        eng.prefill_pace.observe = lambda tokens, seconds: None  # type: ignore[method-assign]
        computed = record_prefills(eng)
        eng.add_request(PROMPTS[0], GREEDY)
        eng.step()  # a row decoding, so that the next prompt is chunked
        (result,) = eng.generate([long_prompt], GREEDY)
        results.append(result.token_ids)
        chunks.append(computed[1:])
    # Tokens only: two even parts of at most 64. Paced: a second holds 32 tokens.
    assert chunks == [[[40], [39]], [[27], [26], [26]]]
    assert results[0] == results[1]


def test_a_second_prompt_waits_rather_than_take_a_sliver_of_the_chunk() -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=3, max_len=128, prefill_chunk=64)
    eng = Engine(target, unrelated, config)
    computed = record_prefills(eng)
    eng.add_request(PROMPTS[0], GREEDY)
    eng.step()  # a row decoding, so that the next prompts are chunked
    first, second = list(range(3, 64)), list(range(100, 141))  # 60 and 40 tokens to compute
    results = eng.generate([first, second], GREEDY)
    # The first takes 60 of the 64 tokens; the second does not start on the 4 left over.
    assert computed[1:] == [[60], [40]]
    alone = Engine(target, unrelated, config).generate([first, second], GREEDY)
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]


@pytest.mark.parametrize("arrival", ["with the long one", "after its first chunk"])
def test_with_nothing_decoding_a_short_prompt_starts_before_a_long_one(arrival: str) -> None:
    target, unrelated = models("qwen2")
    config = EngineConfig(gamma=3, max_slots=3, max_len=128, prefill_chunk=32)
    eng = Engine(target, unrelated, config)
    computed = record_prefills(eng)
    long_prompt = list(range(3, 83))  # 79 tokens to compute
    long = eng.add_request(long_prompt, GREEDY)
    if arrival == "after its first chunk":
        assert eng.step() == []
        # Nothing decodes, and still only a chunk: the step ends early enough for an arrival.
        assert computed == [[27]]
    short = eng.add_request(PROMPTS[0], GREEDY)  # 6 tokens to compute
    first = eng.step()
    # The short prompt alone, and its stream starts at once.
    assert computed[-1] == [6] and [o.request_id for o in first] == [short]
    computed.clear()
    results = {short: first[0].new_token_ids, long: []}
    while eng.has_work():
        for out in eng.step():
            results[out.request_id] += out.new_token_ids
    # Then the long one's (other) chunks between the short one's rounds.
    assert computed == ([[27], [26], [26]] if arrival == "with the long one" else [[26], [26]])
    assert results[short] == hf_greedy("qwen2")[0]
    assert [results[long]] == hf_greedy("qwen2", (tuple(long_prompt),))


def test_the_engine_times_its_prompt_prefills() -> None:
    target, unrelated = models("llama")
    eng = Engine(target, unrelated, EngineConfig(gamma=3, max_slots=2, max_len=128))
    eng.generate([PROMPTS[0]], GREEDY)
    assert eng.prefill_pace.seconds_per_token is None  # 6 tokens: too few to tell a pace
    eng.generate([list(range(3, 83))], GREEDY)
    assert eng.prefill_pace.seconds_per_token is not None
    assert eng.prefill_pace.seconds_per_token > 0


def test_chunked_prefill_fills_the_slot_as_one_prefill_does() -> None:
    target, unrelated = models("llama")
    outputs, caches = [], []
    for chunk in (0, 3):
        config = EngineConfig(gamma=3, max_slots=2, prefill_chunk=chunk)
        eng = Engine(target, unrelated, config)
        eng.add_request(PROMPTS[0], GREEDY)
        eng.step()  # a row decoding, so that the next prompt is chunked
        (result,) = eng.generate([PROMPTS[2]], GREEDY)
        outputs.append(result.token_ids)
        caches.append(eng.target.cache.slot_keys(0, 1, len(PROMPTS[2]) - 1).float())
    assert outputs[0] == outputs[1] == hf_greedy("llama")[2]
    torch.testing.assert_close(caches[0], caches[1], rtol=2e-2, atol=2e-2)


def test_a_new_row_weighs_the_draft_prefill_against_how_long_recent_requests_ran() -> None:
    target, _ = models("llama")
    config = EngineConfig(gamma=4, max_slots=2, max_len=128, prompt_lookup=0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    first_drafted = {}
    histories = {"none": [], "stopped at 3": [(3, True)] * 4, "capped at 3": [(3, False)] * 4}
    for name, history in histories.items():
        eng, rounds = _catch_up_judging_engine(target, perturbed(target, 0.05), config)
        for length, stopped in history:
            eng.output_lengths.observe(length, stopped)
        (result,) = eng.generate([PROMPTS[2]], params)
        assert result.token_ids == hf_greedy("llama")[2]
        first_drafted[name] = next(i for i, r in enumerate(rounds) if r.gamma > 0)
        # The engine remembers its own requests: this one ran to its cap.
        assert eng.output_lengths.finished[-1] == (NEW_TOKENS, False)
    # Fresh, the row drafts from its second round. After requests that stopped by themselves
    # at 3 tokens, the copy would not be repaid, until the row outlives them; ones cut short by
    # their cap say nothing against a longer run.
    assert first_drafted == {"none": 1, "stopped at 3": 3, "capped at 3": 1}
