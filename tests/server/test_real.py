"""The default qwen2.5-coder pair through the server (slow: run with ``-m real``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import ModelNotFoundError, load_pair
from tests.server.conftest import RunningServer, serve


@pytest.fixture(scope="module")
def real_server() -> Iterator[RunningServer]:
    try:
        target, draft = load_pair(None, None, device="cpu", progress=False)
    except ModelNotFoundError as exc:
        pytest.skip(f"the default pair is not available: {exc}")
    assert draft is not None
    config = EngineConfig(gamma=4, max_slots=2, max_len=512)
    engine = Engine(target.model, draft.model, config, target.tokenizer)
    with serve(engine, model_name=target.name, draft_name=draft.name) as running:
        yield running


@pytest.mark.real
def test_real_pair_completes_code(real_server: RunningServer) -> None:
    client = real_server.client(timeout=300)
    result = client.completions.create(
        model=real_server.context.config.model_name,
        prompt="def add(a, b):\n    return",
        max_tokens=4,
        temperature=0,
    )
    assert result.choices[0].text.startswith(" a + b")
    spec = result.model_extra["metrics"]["speculative_decoding"]
    assert spec["num_accepted_draft_tokens"] > 0  # the 0.5B draft agrees with the 1.5B target


@pytest.mark.real
def test_real_pair_streams_chat(real_server: RunningServer) -> None:
    client = real_server.client(timeout=300)
    chunks = list(
        client.chat.completions.create(
            model=real_server.context.config.model_name,
            messages=[
                {"role": "user", "content": "Write a Python function that adds two numbers."}
            ],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.completion_tokens <= 8


@pytest.mark.real
# "auto": the 1.5B coder answers in a ```json fence rather than a <tool_call> block, which the
# server reads as a call of a declared tool; "required": the grammar holds the answer to a
# tool's name and valid arguments, the model picks them.
@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_real_pair_calls_a_tool(real_server: RunningServer, tool_choice: str) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city's name"}},
                "required": ["city"],
            },
        },
    }
    result = real_server.client(timeout=300).chat.completions.create(
        model=real_server.context.config.model_name,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[weather],
        tool_choice=tool_choice,
        max_tokens=48,
        temperature=0,
    )
    [choice] = result.choices
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert "Paris" in json.loads(call.function.arguments)["city"]


@pytest.mark.real
def test_real_pair_answers_in_the_requested_json_schema(real_server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["name", "year"],
        "additionalProperties": False,
    }
    result = real_server.client(timeout=300).chat.completions.create(
        model=real_server.context.config.model_name,
        messages=[{"role": "user", "content": "Name the Python language and its first year."}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        max_tokens=48,
        temperature=0,
    )
    [choice] = result.choices
    assert choice.finish_reason == "stop", choice.message
    answer = json.loads(choice.message.content)
    assert set(answer) == {"name", "year"} and "Python" in answer["name"]
    assert isinstance(answer["year"], int)
    spec = result.model_extra["metrics"]["speculative_decoding"]
    assert spec["num_accepted_draft_tokens"] > 0
