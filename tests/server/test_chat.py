from __future__ import annotations

import math

from engine.engine import Engine
from tests.server.conftest import MODEL, RunningServer, reference_run
from tests.server.test_completions import GREEDY, assert_consistent

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say hello to the world"},
]


def template_ids(reference: Engine, messages: list[dict]) -> list[int]:
    tokenizer = reference.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_chat_goes_through_the_template(server: RunningServer, reference: Engine) -> None:
    result = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, **GREEDY
    )
    ids = template_ids(reference, MESSAGES)
    expected = reference_run(reference, ids, max_tokens=10, temperature=0, ignore_eos=True)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    [choice] = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(ids)
    assert result.usage.completion_tokens == 10
    assert_consistent(result.model_extra["metrics"]["speculative_decoding"])


def test_chat_stream_sends_role_then_content(server: RunningServer) -> None:
    client = server.client()
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=30, **GREEDY
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    first, *content, last = chunks
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in content)
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 30
    assert last.model_extra["metrics"] == full.model_extra["metrics"]


def test_content_parts_and_max_tokens_alias(server: RunningServer) -> None:
    client = server.client()
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "say hello"},
                                     {"type": "text", "text": "to the world"}]},
    ]  # fmt: skip
    joined = [{"role": "user", "content": "say hello\nto the world"}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=5, **GREEDY)
    b = client.chat.completions.create(
        model=MODEL, messages=joined, max_completion_tokens=5, **GREEDY
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.usage.completion_tokens == b.usage.completion_tokens == 5
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1  # same prompt


def test_chat_logprobs(server: RunningServer) -> None:
    result = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy decoding picks the target's most likely token.
        assert math.isclose(entry.logprob, max(t.logprob for t in entry.top_logprobs))
        assert entry.bytes == list(entry.token.encode())


def test_chat_default_max_tokens_fills_the_context(server: RunningServer) -> None:
    long_message = [{"role": "user", "content": "hello world " * 60}]
    result = server.client().chat.completions.create(model=MODEL, messages=long_message, **GREEDY)
    assert result.usage.total_tokens == 256
    assert result.choices[0].finish_reason == "length"


def test_a_follow_up_turn_reuses_the_conversation_held_in_a_slot(
    server: RunningServer, reference: Engine
) -> None:
    client = server.client()
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, **GREEDY)
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "and once more"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=12, **GREEDY
    )
    first_ids, ids = template_ids(reference, MESSAGES), template_ids(reference, conversation)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The whole first turn's prompt (up to how its last token joins the answer) was in a slot.
    assert len(first_ids) - 2 <= cached < len(ids)
    assert second.usage.prompt_tokens == len(ids)
    expected = reference_run(reference, ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert second.choices[0].message.content == expected.text
