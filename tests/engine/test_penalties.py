from __future__ import annotations

import functools

import pytest
import torch

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.penalties import PenaltyState, RowPenalties
from engine.request import Request
from tests.engine.conftest import perturbed, reference_penalise, tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], list(range(40, 63))]
NEW_TOKENS = 16


def _row_penalties(counts, prompt_seen, bias, presence, frequency, repetition) -> RowPenalties:
    return RowPenalties(
        counts=counts,
        prompt_seen=prompt_seen,
        bias=bias,
        presence=torch.tensor(presence),
        frequency=torch.tensor(frequency),
        repetition=torch.tensor(repetition),
    )


def test_each_position_counts_the_output_and_the_drafts_before_it() -> None:
    torch.manual_seed(0)
    rows, positions, vocab = 3, 4, 10
    logits = torch.randn(rows, positions, vocab) * 3
    outputs = [[1, 1, 4], [], [9]]
    prompts = [[2, 3], [4], []]
    drafts = torch.tensor([[1, 5, 1], [0, 0, 7], [9, 9, 2]])
    settings = [(0.5, 0.3, 1.3, {4: 2.0}), (1.0, 0.0, 1.0, {}), (-0.5, 1.5, 0.7, {3: -100.0})]
    counts = torch.zeros(rows, vocab)
    prompt_seen = torch.zeros(rows, vocab, dtype=torch.bool)
    bias = torch.zeros(rows, vocab)
    for b in range(rows):
        for token in outputs[b]:
            counts[b, token] += 1
        prompt_seen[b, prompts[b]] = True
        for token, value in settings[b][3].items():
            bias[b, token] = value
    penalties = _row_penalties(
        counts, prompt_seen, bias, *[[s[i] for s in settings] for i in range(3)]
    )

    got = penalties.apply(logits, drafts)
    for b in range(rows):
        for t in range(positions):
            generated = outputs[b] + drafts[b, :t].tolist()
            want = reference_penalise(logits[b, t], generated, prompts[b], *settings[b])
            torch.testing.assert_close(got[b, t].double(), want, rtol=1e-5, atol=1e-5)

    # A draft step scores one position after all the tokens drafted so far.
    step = penalties.apply(logits[:, :1], drafts[:, :2])
    for b in range(rows):
        generated = outputs[b] + drafts[b, :2].tolist()
        want = reference_penalise(logits[b, 0], generated, prompts[b], *settings[b])
        torch.testing.assert_close(step[b, 0].double(), want, rtol=1e-5, atol=1e-5)


def _request(request_id: str, slot: int, params: SamplingParams, prompt: list[int]) -> Request:
    request = Request(request_id, prompt, params, seed=0, gamma=0, max_new_tokens=8)
    request.slot = slot
    return request


def test_state_counts_new_tokens_once_and_resets_for_a_new_occupant() -> None:
    state = PenaltyState(slots=2, vocab=8, device=torch.device("cpu"))
    plain = SamplingParams()
    assert state.rows([_request("a", 0, plain, [1])]) is None
    assert state.counts is None  # nothing allocated while no row penalises

    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0, logit_bias={6: 5.0})
    first = _request("x", 0, params, [3, 3])
    first.output_token_ids = [4, 4]
    rows = state.rows([first])
    assert rows is not None and rows.counts[0].tolist() == [0, 0, 0, 0, 2, 0, 0, 0]
    first.output_token_ids += [5]
    rows = state.rows([first])  # only the new token is added
    assert rows is not None and rows.counts[0].tolist() == [0, 0, 0, 0, 2, 1, 0, 0]
    assert rows.prompt_seen is not None and rows.prompt_seen[0].nonzero().flatten().tolist() == [3]
    assert rows.bias is not None and rows.bias[0, 6] == 5.0

    # The same id in the same slot is still a new request (generate() reuses ids): reset.
    second = _request("x", 0, SamplingParams(presence_penalty=1.0), [7])
    neutral = _request("n", 1, plain, [1])
    rows = state.rows([neutral, second])
    assert rows is not None
    assert rows.counts[1].sum() == 0
    assert rows.prompt_seen is None and rows.bias is None and rows.repetition is None
    assert rows.presence.tolist() == [0.0, 1.0]

    # A plain row landing in a slot a biased request left keeps a neutral bias.
    third = _request("y", 1, params, [2])
    reused = _request("z", 0, plain, [1])
    rows = state.rows([reused, third])
    assert rows is not None and rows.bias is not None
    assert rows.bias[0].abs().sum() == 0 and rows.bias[1, 6] == 5.0
    assert rows.repetition is not None and rows.repetition.tolist() == [1.0, 2.0]


@functools.cache
def _models() -> tuple:
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.3), tiny_model("qwen2", seed=1, layers=1, hidden=32)


def _plain_loop(target, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding with the whole sequence re-run every token and penalties by hand."""
    tokens = list(prompt)
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            logits = target(torch.tensor([tokens])).logits[0, -1]
        scored = reference_penalise(
            logits, tokens[len(prompt) :], prompt, params.presence_penalty,
            params.frequency_penalty, params.repetition_penalty, params.logit_bias or {},
        )  # fmt: skip
        tokens.append(int(scored.argmax()))
    return tokens[len(prompt) :]


PENALTY_CASES = {
    "presence-frequency": {"presence_penalty": 1.5, "frequency_penalty": 0.8},
    "repetition": {"repetition_penalty": 1.8},
    "bias": {"logit_bias": {17: 4.0, 30: -100.0}},
    "all": {
        "presence_penalty": -0.5,
        "frequency_penalty": 1.2,
        "repetition_penalty": 0.8,
        "logit_bias": {17: 3.0},
    },  # fmt: skip
}


@pytest.mark.parametrize("case", PENALTY_CASES.values(), ids=PENALTY_CASES.keys())
def test_greedy_penalised_decoding_matches_a_plain_loop_with_and_without_drafts(case) -> None:
    target, close_draft, unrelated = _models()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, **case)
    want = [_plain_loop(target, p, params) for p in PROMPTS]
    unpenalised = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert [_plain_loop(target, p, unpenalised) for p in PROMPTS] != want  # it bites
    for draft, gamma in ((None, 0), (target, 3), (close_draft, 3), (unrelated, 4)):
        eng = Engine(target, draft, EngineConfig(gamma=gamma, max_slots=4, max_len=64))
        got = [r.token_ids for r in eng.generate(PROMPTS, params)]
        assert got == want, (gamma, draft is unrelated)
        if draft is target:
            # The draft penalises its own drafts as the target will: a copy agrees always.
            assert eng.stats.acceptance_rate == 1.0


def test_min_tokens_holds_back_eos_and_stop_ids_with_and_without_drafts() -> None:
    target, close_draft, _ = _models()
    prompt = PROMPTS[0]
    free = _plain_loop(target, prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    eos, stop_id = free[2], free[5]
    assert eos not in free[:2] and stop_id not in free[:5] and eos != stop_id
    min_tokens = 8
    # The plain loop: ending ids get no probability within the first min_tokens tokens.
    want: list[int] = []
    while len(want) < NEW_TOKENS and not (want and want[-1] in (eos, stop_id)):
        with torch.no_grad():
            logits = target(torch.tensor([prompt + want])).logits[0, -1]
        if len(want) < min_tokens:
            logits[[eos, stop_id]] = float("-inf")
        want.append(int(logits.argmax()))
    assert len(want) > min_tokens and eos not in want[:-1] and stop_id not in want[:-1]
    target.generation_config.eos_token_id = eos
    try:
        for draft, gamma in ((None, 0), (target, 4), (close_draft, 3)):
            eng = Engine(target, draft, EngineConfig(gamma=gamma, max_slots=2, max_len=64))
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[stop_id])
            assert eng.generate([prompt], params)[0].token_ids == free[:3]  # EOS ends it
            params.min_tokens = min_tokens
            (result,) = eng.generate([prompt], params)
            assert result.token_ids == want, gamma
            if draft is target:
                assert eng.stats.acceptance_rate == 1.0  # the draft masks the same ids
    finally:
        target.generation_config.eos_token_id = 2


def test_repetition_penalty_matches_transformers_generate() -> None:
    target, close_draft, _ = _models()
    for prompt in PROMPTS:
        hf = target.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
            repetition_penalty=1.5, eos_token_id=None, pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
        eng = Engine(target, close_draft, EngineConfig(gamma=3, max_slots=2, max_len=64))
        params = SamplingParams(
            max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, repetition_penalty=1.5
        )
        assert eng.generate([prompt], params)[0].token_ids == hf


def test_a_row_without_penalties_is_untouched_by_its_neighbours_and_its_slots_past() -> None:
    target, close_draft, _ = _models()
    eng = Engine(target, close_draft, EngineConfig(gamma=3, max_slots=2, max_len=64))
    plain = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    alone = [r.token_ids for r in eng.generate(PROMPTS[:2], plain)]
    biased = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logit_bias={17: 100.0},
        frequency_penalty=2.0, repetition_penalty=1.5,
    )  # fmt: skip
    first = eng.generate(PROMPTS[:2], [biased, biased])
    assert all(r.token_ids == [17] * NEW_TOKENS for r in first)  # +100 wins every position
    # Both slots were left penalised; now one plain row and one penalised row share a batch.
    mixed = eng.generate(PROMPTS[:2], [plain, biased])
    assert mixed[0].token_ids == alone[0]
    assert mixed[1].token_ids == [17] * NEW_TOKENS


def test_logit_bias_outside_the_vocabulary_is_refused() -> None:
    target, _, _ = _models()
    eng = Engine(target, None, EngineConfig(gamma=0, max_slots=1, max_len=64))
    with pytest.raises(ValueError, match="logit_bias"):
        eng.add_request([1, 2], SamplingParams(logit_bias={eng.vocab_size: 1.0}))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {3: 101.0}}, "between -100 and 100"),
        ({"logit_bias": {-1: 1.0}}, ">= 0"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens must be between 0 and max_tokens"),
    ],
)
def test_sampling_params_validate_penalties(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
