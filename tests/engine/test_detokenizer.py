from __future__ import annotations

import random

from engine.config import SamplingParams
from engine.detokenizer import OutputProcessor
from engine.request import Request


def _request(tokenizer, **params) -> Request:
    params.setdefault("max_tokens", 100)
    return Request("r", [1], SamplingParams(**params), seed=0, gamma=0, max_new_tokens=100)


def _stream(tokenizer, text: str, chunk: int, **params) -> tuple[str, Request, list[str]]:
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id})
    request = _request(tokenizer, **params)
    ids = tokenizer(text).input_ids
    deltas = []
    for start in range(0, len(ids), chunk):
        _, delta = processor.append(request, ids[start : start + chunk])
        deltas.append(delta)
        if request.finish_reason:
            break
    return "".join(deltas), request, deltas


def test_stream_without_stops_reproduces_the_text(tokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    for chunk in (1, 3, 50):
        streamed, request, _ = _stream(tokenizer, text, chunk)
        assert streamed == text and request.finish_reason is None


def test_stop_string_split_across_tokens_and_chunks_is_caught(tokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    for chunk in (1, 2, 5, 50):
        streamed, request, _ = _stream(tokenizer, text, chunk, stop=["fox jum"])
        assert streamed == "the quick brown "
        assert request.finish_reason == "stop"
        # Tokens after the one that completed the stop string are dropped.
        assert "fox jum" in tokenizer.decode(request.output_token_ids)
        assert "fox jum" not in tokenizer.decode(request.output_token_ids[:-1])


def test_a_stop_string_within_min_tokens_does_not_count(tokenizer) -> None:
    text = "the fox ran and the fox sat down"
    ids = tokenizer(text).input_ids
    # The fewest tokens whose text holds the first "fox": it completes within min_tokens.
    first = next(k for k in range(1, len(ids)) if "fox" in tokenizer.decode(ids[:k]))
    for chunk in (1, 3, 50):
        streamed, request, _ = _stream(tokenizer, text, chunk, stop=["fox"], min_tokens=first)
        assert streamed == "the fox ran and the " and request.finish_reason == "stop"
        plain, _, _ = _stream(tokenizer, text, chunk, stop=["fox"])
        assert plain == "the "


def test_possible_stop_prefix_is_held_back_until_resolved(tokenizer) -> None:
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id})
    request = _request(tokenizer, stop=["lazy cat"])
    ids = tokenizer("over the lazy dog").input_ids
    emitted = ""
    for token in ids:
        _, delta = processor.append(request, [token])
        emitted += delta
        assert not emitted.endswith("lazy")  # never streamed while it could still be a stop
    assert emitted == "over the lazy dog" and request.finish_reason is None


def test_incomplete_utf8_is_held_back(tokenizer) -> None:
    text = "héllo wörld ☃"
    streamed, _, deltas = _stream(tokenizer, text, 1)
    assert streamed == text
    assert all("\ufffd" not in d for d in deltas)


def test_eos_and_stop_token_ids_finish_and_are_not_in_text(tokenizer) -> None:
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id})
    request = _request(tokenizer)
    ids = tokenizer("hello world").input_ids
    tokens, delta = processor.append(request, ids + [tokenizer.eos_token_id] + ids)
    assert tokens == ids + [tokenizer.eos_token_id]
    assert delta == "hello world" and request.finish_reason == "stop"
    ignoring = _request(tokenizer, ignore_eos=True, stop_token_ids=[ids[1]])
    tokens, _ = processor.append(ignoring, [tokenizer.eos_token_id] + ids)
    assert tokens == [tokenizer.eos_token_id] + ids[:2]


def test_max_new_tokens_finishes_with_length(tokenizer) -> None:
    processor = OutputProcessor(tokenizer, set())
    request = _request(tokenizer)
    request.max_new_tokens = 3
    tokens, _ = processor.append(request, [40, 41, 42, 43, 44])
    assert tokens == [40, 41, 42] and request.finish_reason == "length"


def test_incremental_text_equals_decoding_everything(tokenizer) -> None:
    # Random ids include byte tokens that form no complete character: the streamed text must
    # still come out as one decode of all the tokens would give it.
    generator = random.Random(0)
    for _ in range(20):
        ids = [generator.randrange(3, len(tokenizer)) for _ in range(60)]
        processor = OutputProcessor(tokenizer, set())
        request = _request(tokenizer, max_tokens=60)
        request.max_new_tokens = len(ids)
        streamed, start = "", 0
        while start < len(ids):
            size = generator.randint(1, 6)
            _, delta = processor.append(request, ids[start : start + size])
            streamed += delta
            start += size
        assert request.finish_reason == "length"
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_round_decodes_only_recent_tokens(tokenizer) -> None:
    lengths: list[int] = []

    class Recording:
        def decode(self, ids: list[int], **kwargs) -> str:
            lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    processor = OutputProcessor(Recording(), set())  # type: ignore[arg-type]
    request = _request(tokenizer, max_tokens=1000)
    request.max_new_tokens = 1000
    ids = tokenizer("the quick brown fox jumps over the lazy dog " * 40).input_ids
    streamed = "".join(processor.append(request, ids[i : i + 2])[1] for i in range(0, 400, 2))
    assert streamed == tokenizer.decode(ids[:400])
    assert max(lengths) <= 4  # two rounds' tokens, not the whole completion
