"""Structured output over HTTP: OpenAI's response_format and vLLM's structured_outputs reach the
engine's grammar, on both routes, streamed or not; bad grammars are 400s."""

from __future__ import annotations

import json
import re

import openai
import pytest

from engine.config import GrammarSpec
from engine.engine import Engine
from tests.server.conftest import MODEL, RunningServer, assert_refused_before_engine, reference_run

USER = [{"role": "user", "content": "pick an animal"}]
ANIMALS = ["the dog", "the fox", "hello world"]
ENUM_SCHEMA = {"type": "string", "enum": ["fox", "dog", "lazy dog"]}


def test_choices_on_both_routes_match_the_engine(server: RunningServer, reference: Engine) -> None:
    client = server.client()
    spec = GrammarSpec("choice", json.dumps(ANIMALS))
    expected = reference_run(reference, "hello", max_tokens=20, temperature=0, grammar=spec)
    assert expected.text in ANIMALS and expected.finish_reason == "stop"
    result = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ANIMALS}},
    )
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=20,
        temperature=0.8,
        seed=5,
        n=3,
        extra_body={"structured_outputs": {"choice": ANIMALS}},
    )
    assert all(c.message.content in ANIMALS for c in chat.choices)


def test_a_json_schema_constrains_chat_streamed_or_not(server: RunningServer) -> None:
    client = server.client()
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "animal", "schema": ENUM_SCHEMA, "strict": True},
    }
    whole = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=20, temperature=0, response_format=response_format
    )
    text = whole.choices[0].message.content
    assert json.loads(text) in ENUM_SCHEMA["enum"] and whole.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=20,
        temperature=0,
        response_format=response_format,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_output_is_a_json_object_prefix(server: RunningServer) -> None:
    result = server.client().completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=12,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    text = result.choices[0].text
    assert text.lstrip().startswith("{")
    if result.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_regex_holds_under_sampling(server: RunningServer) -> None:
    result = server.client().completions.create(
        model=MODEL,
        prompt="the quick",
        max_tokens=16,
        temperature=1.0,
        seed=11,
        n=4,
        extra_body={"structured_outputs": {"regex": "[a-z]{1,5}-[0-9]{2}"}},
    )
    for choice in result.choices:
        assert choice.finish_reason == "stop", choice
        assert re.fullmatch("[a-z]{1,5}-[0-9]{2}", choice.text), choice.text


REFUSED = [  # (fields, the error's param, words its message contains)
    ({"structured_outputs": {"regex": "(["}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs",
     "exactly one of"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs",
     "invalid grammar"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "nonsense"}}}}, "response_format", "nonsense"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, None,
     "not both"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "words"), REFUSED)
def test_bad_structured_outputs_are_refused_before_the_engine(
    server: RunningServer, fields: dict, param: str | None, words: str
) -> None:
    body = {"prompt": "hello", "max_tokens": 4, **fields}
    assert_refused_before_engine(server, "/v1/completions", body, param, words)


def test_the_sdk_raises_for_an_invalid_schema(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError, match="nonsense"):
        server.client().chat.completions.create(
            model=MODEL,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        )
