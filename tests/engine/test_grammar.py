from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from engine.config import EngineConfig, GrammarSpec, SamplingParams
from engine.engine import Engine
from engine.grammar import (
    DraftConstraint,
    GrammarCompiler,
    allowed_tokens,
    constrain,
    verify_bitmask,
)
from engine.sampling import warp_probs
from tests.engine.conftest import VOCAB, perturbed, tiny_model
from tests.engine.test_verifier import _chi_square, _chi_square_critical

EOS = 2  # the tiny tokenizer's </s>, and the tiny models' EOS
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], list(range(40, 63))]
REGEX = GrammarSpec("regex", "[a-z ]{3,30}[0-9]{2}")
SCHEMA = GrammarSpec(
    "json_schema",
    json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
            "required": ["name", "n"],
        }
    ),
)
CHOICES = ["the dog", "the fox", "hello", "hello world", "fox"]


@functools.cache
def _models() -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedModel]:
    target = tiny_model("qwen2", seed=0)
    return target, perturbed(target, 0.02), tiny_model("qwen2", seed=7)


def _allowed_reference(matcher) -> torch.Tensor:
    """The matcher's next-token set through llguidance's byte-per-token API (independent of
    the bitmask unpacking under test)."""
    bias = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[: min(VOCAB, len(bias))] = bias[:VOCAB] > 0
    return allowed


def _constrained_greedy(target, prompt: list[int], matcher, max_tokens: int) -> list[int]:
    """Target-only greedy decoding under the grammar, one token at a time, re-running the
    whole sequence each step."""
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        with torch.no_grad():
            logits = target(torch.tensor([prompt + tokens])).logits[0, -1]
        logits[~_allowed_reference(matcher)] = float("-inf")
        token = int(logits.argmax())
        tokens.append(token)
        assert matcher.consume_token(token)
        if matcher.is_stopped() or token == EOS:
            break
    return tokens


def test_invalid_grammars_are_refused_with_the_reason(tokenizer: PreTrainedTokenizerFast) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    cases = {
        GrammarSpec("regex", "(["): "invalid regex",
        GrammarSpec("json_schema", "[1]"): "must be a JSON object",
        GrammarSpec("json_schema", "{"): "not valid JSON",
        GrammarSpec("json_schema", '{"type": "nonsense"}'): "nonsense",
        GrammarSpec("choice", "[]"): "non-empty list",
        GrammarSpec("choice", '["a", 3]'): "non-empty list",
        GrammarSpec("grammar", "start: undefined_rule"): "invalid grammar",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            compiler.matcher(spec)
    with pytest.raises(ValueError, match="kind must be one of"):
        GrammarSpec("yaml", "")
    with pytest.raises(ValueError, match="needs the model's"):
        GrammarCompiler(None, VOCAB, {EOS}).matcher(REGEX)


def test_engine_refuses_an_invalid_grammar_before_queueing(tokenizer) -> None:
    target, _, _ = _models()
    eng = Engine(target, None, EngineConfig(gamma=0, max_slots=1, max_len=64), tokenizer)
    with pytest.raises(ValueError, match="invalid regex"):
        eng.add_request([5, 6], SamplingParams(grammar=GrammarSpec("regex", "([")))
    assert not eng.has_work()


def test_verify_masks_follow_each_draft_prefix_and_leave_the_matcher_as_it_was(
    tokenizer,
) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    fresh = functools.partial(compiler.matcher, REGEX)
    good = tokenizer("the fox 12").input_ids
    bad_at = 2
    drafts = [good[:5], good[:bad_at] + [tokenizer("X").input_ids[0]] + good[bad_at:4], []]
    matchers = [fresh(), fresh(), fresh()]
    matchers[2].consume_tokens(good[:3])  # a row mid-output
    width = 6
    bitmask = verify_bitmask(matchers, drafts, width, VOCAB)
    allowed = allowed_tokens(bitmask, VOCAB, torch.device("cpu"))
    assert allowed.shape == (3, width, VOCAB)
    for row, proposed in enumerate(drafts):
        valid = len(proposed) if row != 1 else bad_at
        for position in range(width):
            reference = fresh()
            if row == 2:
                reference.consume_tokens(good[:3])
            reference.consume_tokens(proposed[: min(position, valid)])
            assert torch.equal(allowed[row, position], _allowed_reference(reference)), (
                row,
                position,
            )
    # Each matcher is back where it was: it accepts exactly what a fresh one does.
    for matcher, done in zip(matchers, ([], [], good[:3]), strict=True):
        reference = fresh()
        reference.consume_tokens(done)
        assert torch.equal(_allowed_reference(matcher), _allowed_reference(reference))
        assert not matcher.is_error()


def test_a_draft_that_completes_the_grammar_and_then_proposes_eos_leaves_the_matcher_as_it_was(
    tokenizer,
) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    spec = GrammarSpec("choice", json.dumps(CHOICES))
    the, dog = tokenizer("the").input_ids, tokenizer("the dog").input_ids[1:]
    matcher = compiler.matcher(spec)
    assert matcher.consume_tokens(the)
    # "the dog" is complete without EOS: the matcher stops there and takes EOS without
    # counting it, which a rollback of every draft would have undone "the" for.
    verify_bitmask([matcher], [[*dog, EOS]], len(dog) + 2, VOCAB)
    reference = compiler.matcher(spec)
    assert reference.consume_tokens(the)
    assert torch.equal(_allowed_reference(matcher), _allowed_reference(reference))
    assert matcher.validate_tokens(dog) == len(dog)


def test_draft_masks_follow_each_draft_and_leave_the_matchers_as_they_were(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    spec = GrammarSpec("choice", json.dumps(CHOICES))
    matchers = [compiler.matcher(spec), None, compiler.matcher(spec)]
    assert matchers[2].consume_tokens(tokenizer("the").input_ids)
    constraint = DraftConstraint(matchers, VOCAB)
    torch.manual_seed(0)
    drafted: list[list[int]] = [[], [], []]
    for _ in range(8):
        logits = torch.randn(3, VOCAB)
        masked = constraint.mask(logits)
        assert torch.equal(masked[1], logits[1])  # a row without a grammar drafts freely
        for row in (0, 2):
            reference = compiler.matcher(spec)
            assert reference.consume_tokens(tokenizer("the").input_ids if row else [])
            for token in drafted[row]:  # up to the grammar's end: drafts past it are free
                if reference.is_stopped():
                    break
                assert reference.consume_token(token)
            allowed = _allowed_reference(reference)
            if reference.is_stopped():
                assert torch.equal(masked[row], logits[row])
            else:
                assert torch.equal(torch.isfinite(masked[row]), allowed)
                assert torch.equal(masked[row][allowed], logits[row][allowed])
        tokens = masked.argmax(-1).tolist()
        constraint.consume(tokens)
        for row in range(3):
            drafted[row].append(tokens[row])
    # Row 0 is on its way to a choice; row 2's grammar completed ("the" + " dog" or " fox",
    # at most 4 tokens), and its later drafts were free.
    text = tokenizer.decode(drafted[0])
    assert any(choice.startswith(text) or text.startswith(choice) for choice in CHOICES)
    assert ("the" + tokenizer.decode(drafted[2])).startswith(("the dog", "the fox"))
    constraint.rollback()
    done_before = ([], tokenizer("the").input_ids)
    for matcher, done in zip((matchers[0], matchers[2]), done_before, strict=True):
        reference = compiler.matcher(spec)
        assert reference.consume_tokens(done)
        assert torch.equal(_allowed_reference(matcher), _allowed_reference(reference))


def test_masked_drafts_are_accepted_more_often(tokenizer, monkeypatch) -> None:
    target, close_draft, _ = _models()
    spec = GrammarSpec("regex", "[a-z ]{3,30}[0-9]{2}")
    params = SamplingParams(max_tokens=24, temperature=0, grammar=spec)
    config = EngineConfig(gamma=4, max_slots=4, max_len=64, adaptive_gamma=False, prompt_lookup=0)
    rates, outputs = [], []
    for masked in (True, False):
        if not masked:
            monkeypatch.setattr(DraftConstraint, "mask", lambda self, logits: logits)
        eng = Engine(target, close_draft, config, tokenizer)
        outputs.append([r.token_ids for r in eng.generate(PROMPTS, params)])
        rates.append(eng.stats.acceptance_rate)
    assert outputs[0] == outputs[1]
    # A random model's free choice is rarely grammatical, the draft's like the target's: free,
    # the close draft is mostly refused; masked, it picks the target's constrained choice.
    assert rates[0] > rates[1] + 0.3, rates


def test_constrain_masks_only_grammar_rows_and_never_leaves_a_position_empty(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    done = compiler.matcher(GrammarSpec("choice", '["fox"]'))
    assert done.consume_tokens(tokenizer("fox").input_ids[:-1])  # one token from complete
    torch.manual_seed(0)
    model_logits = torch.randn(2, 3, VOCAB)
    logits = model_logits.clone()
    logits[1, :, EOS] = float("-inf")  # as min_tokens masks EOS
    last = tokenizer("fox").input_ids[-1]
    scored = constrain(logits, model_logits, [1], [done], [[last, EOS]])
    assert torch.equal(scored[0], logits[0])  # unconstrained row untouched
    assert int(scored[1, 0].argmax()) == last and torch.isfinite(scored[1, 0]).sum() == 1
    # After "fox" the grammar allows only EOS, which the other rule forbids: the grammar wins.
    assert torch.isfinite(scored[1, 1]).sum() == 1 and scored[1, 1].argmax() == EOS
    assert not torch.isnan(torch.softmax(scored[1, 1], -1)).any()


@pytest.mark.parametrize("spec", [REGEX, SCHEMA], ids=["regex", "json_schema"])
def test_greedy_constrained_output_matches_target_only_with_any_draft(spec, tokenizer) -> None:
    target, close_draft, unrelated = _models()
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    new_tokens = 24
    want = [_constrained_greedy(target, p, compiler.matcher(spec), new_tokens) for p in PROMPTS]
    free = Engine(target, None, EngineConfig(gamma=0, max_slots=4, max_len=64), tokenizer)
    plain = SamplingParams(max_tokens=new_tokens, temperature=0)
    assert [r.token_ids for r in free.generate(PROMPTS, plain)] != want  # it bites
    params = SamplingParams(max_tokens=new_tokens, temperature=0, grammar=spec)
    for draft, gamma in ((None, 0), (target, 3), (close_draft, 4), (unrelated, 4)):
        config = EngineConfig(gamma=gamma, max_slots=4, max_len=64, adaptive_gamma=False)
        eng = Engine(target, draft, config, tokenizer)
        results = eng.generate(PROMPTS, params)
        assert [r.token_ids for r in results] == want, (gamma, draft is unrelated)
        for result in results:
            if result.finish_reason == "stop" and spec is REGEX:
                assert re.fullmatch("[a-z ]{3,30}[0-9]{2}", result.text), result.text
        if draft is unrelated:
            assert eng.stats.rejections > 0  # ungrammatical drafts were proposed and refused
    if spec is REGEX:
        assert any(r.finish_reason == "stop" for r in results)  # the grammar's end was reached
    else:
        assert all(r.text.startswith("{") for r in results)


def test_a_complete_grammar_ends_the_request_without_eos_even_when_eos_is_ignored(
    tokenizer,
) -> None:
    target, close_draft, _ = _models()
    eng = Engine(target, close_draft, EngineConfig(gamma=3, max_slots=2, max_len=64), tokenizer)
    spec = GrammarSpec("choice", json.dumps(["the dog", "fox"]))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, grammar=spec)
    (result,) = eng.generate([PROMPTS[0]], params)
    assert result.text in ("the dog", "fox") and result.finish_reason == "stop"
    assert EOS not in result.token_ids
    # min_tokens cannot stretch a grammar past its end: the request ends there all the same.
    params = SamplingParams(max_tokens=30, temperature=0, min_tokens=20, grammar=spec)
    (again,) = eng.generate([PROMPTS[0]], params)
    assert again.text == result.text and again.finish_reason == "stop"


def _exact_law(target, prompt: list[int], compiler, spec, temperature: float):
    """Every complete output under the grammar, with its probability under the target alone
    (the vocabulary and the grammar are tiny, so the tree can be walked whole)."""
    law: dict[tuple[int, ...], float] = {}
    stack = [((), 1.0)]
    while stack:
        prefix, weight = stack.pop()
        matcher = compiler.matcher(spec)
        assert matcher.consume_tokens(list(prefix))
        if prefix and (matcher.is_stopped() or prefix[-1] == EOS):
            law[prefix] = law.get(prefix, 0.0) + weight
            continue
        with torch.no_grad():
            logits = target(torch.tensor([prompt + list(prefix)])).logits[:, -1:].float()
        logits[0, 0, ~_allowed_reference(matcher)] = float("-inf")
        probs = warp_probs(
            logits,
            torch.tensor([temperature]),
            torch.tensor([0]),
            torch.tensor([1.0]),
            False,
            False,
        )[0, 0].double()
        for token in torch.nonzero(probs).flatten().tolist():
            stack.append(((*prefix, token), weight * float(probs[token])))
    return law


@pytest.mark.parametrize("which", ["unrelated", "close"])
def test_sampled_constrained_outputs_follow_the_masked_target_law(which, tokenizer) -> None:
    target, close_draft, unrelated = _models()
    draft = unrelated if which == "unrelated" else close_draft
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    spec = GrammarSpec("choice", json.dumps(CHOICES))
    temperature = 1.5  # flattens the law so that many of its outputs are drawn
    prompt = PROMPTS[1]
    law = _exact_law(target, prompt, compiler, spec, temperature)
    assert abs(sum(law.values()) - 1) < 1e-6 and len(law) > 10
    outcomes = list(law)
    draws = 3000
    config = EngineConfig(gamma=3, max_slots=16, max_len=64, adaptive_gamma=False)
    eng = Engine(target, draft, config, tokenizer)
    params = [
        SamplingParams(max_tokens=16, temperature=temperature, seed=seed, grammar=spec)
        for seed in range(draws)
    ]
    counts = torch.zeros(len(outcomes) + 1, dtype=torch.float64)
    for result in eng.generate([prompt] * draws, params):
        assert result.text in CHOICES
        key = tuple(result.token_ids)
        counts[outcomes.index(key) if key in law else -1] += 1
    probs = torch.tensor([law[o] for o in outcomes] + [0.0], dtype=torch.float64)
    statistic, dof = _chi_square(counts, probs)
    assert statistic < _chi_square_critical(dof), (statistic, dof)
    assert eng.stats.rejections > 0  # the residual path was taken


def test_each_request_gets_its_own_copy_of_a_compiled_grammar(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, VOCAB, {EOS})
    first = compiler.matcher(REGEX)
    assert first.consume_tokens(tokenizer("the fox").input_ids)
    second = compiler.matcher(REGEX)  # from the kept compilation
    pristine = GrammarCompiler(tokenizer, VOCAB, {EOS}).matcher(REGEX)
    assert torch.equal(_allowed_reference(second), _allowed_reference(pristine))
    assert not torch.equal(_allowed_reference(first), _allowed_reference(second))
    # GBNF is read as well as Lark.
    for source in ('root ::= "fox" | "dog"', 'start: "fox" | "dog"'):
        matcher = compiler.matcher(GrammarSpec("grammar", source))
        fox = tokenizer("fox").input_ids
        assert matcher.validate_tokens(fox) == len(fox)
        assert matcher.validate_tokens(tokenizer("cat").input_ids) == 0
