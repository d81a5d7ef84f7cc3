"""Folding SSE chunks into a request record: TTFT, tokens per chunk, ITL per token."""

from __future__ import annotations

import pytest

from loadtest.records import StreamAccumulator, chunk_text


def chat(content: str | None, completion_tokens: int | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    chunk: dict = {"choices": [{"index": 0, "delta": delta}]}
    if completion_tokens is not None:
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": completion_tokens}
    return chunk


def test_chunk_text_reads_chat_and_completions() -> None:
    assert chunk_text(chat("hi")) == "hi"
    assert chunk_text({"choices": [{"index": 0, "text": "yo"}]}) == "yo"
    assert chunk_text({"choices": [], "usage": {}}) == ""


def test_multi_token_chunks_split_their_gap_per_token() -> None:
    acc = StreamAccumulator("qa", start=10.0)
    acc.add(10.1, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                   "usage": {"completion_tokens": 0}})  # fmt: skip
    acc.add(11.0, chat("ab", 2))
    acc.add(11.6, chat("cde", 5))
    acc.add(11.8, chat("f", 6))
    acc.add(11.9, {"choices": [], "usage": {"completion_tokens": 6}})
    record = acc.finish(12.0)
    assert record.ok and record.error is None
    assert record.ttft == pytest.approx(1.0)
    assert record.output_tokens == 6 and record.exact_tokens and record.per_token_itl
    assert record.itl == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert record.e2e == pytest.approx(2.0)


def test_without_usage_each_chunk_counts_as_one_token() -> None:
    acc = StreamAccumulator("qa", start=0.0)
    for t, text in ((0.5, "a"), (0.7, "bc"), (1.0, "d")):
        acc.add(t, chat(text))
    record = acc.finish(1.1)
    assert record.output_tokens == 3 and not record.exact_tokens and not record.per_token_itl
    assert record.itl == pytest.approx([0.2, 0.3])


def test_final_usage_alone_gives_exact_tokens_but_per_chunk_itl() -> None:
    acc = StreamAccumulator("qa", start=0.0)
    acc.add(0.5, chat("ab"))
    acc.add(0.9, chat("cd"))
    acc.add(1.0, {"choices": [], "usage": {"completion_tokens": 4}})
    record = acc.finish(1.0)
    assert record.output_tokens == 4 and record.exact_tokens and not record.per_token_itl
    assert record.itl == pytest.approx([0.4])


def test_error_payloads_and_empty_streams_fail() -> None:
    acc = StreamAccumulator("qa", start=0.0)
    acc.add(0.1, chat("a"))
    acc.add(0.2, {"error": {"message": "engine died"}})
    assert not acc.finish(0.3).ok
    empty = StreamAccumulator("qa", start=0.0).finish(0.1)
    assert not empty.ok and empty.error == "empty stream"
