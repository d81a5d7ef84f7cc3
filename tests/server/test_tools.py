"""Function calling: hermes blocks parsed into OpenAI tool calls, whole or streamed; the request
fields that drive it; tools and forced calls in the prompt; the HTTP shapes clients read."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest

from engine.engine import Engine
from engine.request import RequestOutput, RequestStats
from server import chat
from server.protocol import NamedToolChoice, Tool
from server.tools import (
    CLOSE,
    Parsed,
    ToolCallStream,
    finish_reason,
    forced_grammar,
    forced_prefix,
    parse_tool_calls,
)
from tests.server.conftest import (
    MODEL,
    RunningServer,
    assert_refused_before_engine,
    make_engine,
    reference_run,
    serve,
)
from tests.server.test_completions import GREEDY

GREEDY_PARAMS = {"temperature": 0, "ignore_eos": True}

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# Prints the tools and the calls of the history, as Qwen2.5's template does (`| tojson`).
TOOLS_TEMPLATE = (
    "{% if tools %}<s>tools:{% for tool in tools %} {{ tool | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}"
    "{% for call in m.tool_calls or [] %}[{{ call.function.name }} "
    "{{ call.function.arguments | tojson }}]{% endfor %}"
    "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
TOOLS_TEXT = (
    '<s>tools: {"type": "function", "function": {"name": "get_weather", '
    '"parameters": {"type": "object"}}}'
)


def block(name: str, arguments: Any) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def functions(parsed: Parsed) -> list[dict[str, str]]:
    """The calls without their random ids."""
    return [call["function"] for call in parsed.calls]


# ---- parsing a whole answer -------------------------------------------------------------------


def test_a_single_call() -> None:
    parsed = parse_tool_calls(block("get_weather", {"city": "Paris"}))
    [call] = parsed.calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parsed.content == ""


def test_several_calls_after_some_text() -> None:
    text = "Let me check both.\n" + block("a", {"x": 1}) + "\n" + block("b", {}) + "\n"
    parsed = parse_tool_calls(text)
    assert parsed.content == "Let me check both."  # the whitespace around the blocks is dropped
    assert functions(parsed) == [{"name": "a", "arguments": '{"x": 1}'},
                                 {"name": "b", "arguments": "{}"}]  # fmt: skip
    assert len({call["id"] for call in parsed.calls}) == 2


def test_an_unclosed_last_block_counts_if_its_json_parses() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n')
    assert functions(parsed) == [{"name": "f", "arguments": '{"x": 1}'}]
    cut = '<tool_call>\n{"name": "f", "argum'  # cut by max_tokens: no call, the text stays
    assert parse_tool_calls(cut) == Parsed(content=cut)


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n["f", {}]\n</tool_call>',  # JSON, but not an object
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>',  # arguments neither kind
    ],
)
def test_a_block_that_is_no_call_stays_content(bad: str) -> None:
    text = "before " + bad + "\n" + block("g", {})
    parsed = parse_tool_calls(text)
    assert parsed.content == "before " + bad
    assert functions(parsed) == [{"name": "g", "arguments": "{}"}]


def test_arguments_as_a_string_an_object_or_missing() -> None:
    as_string = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert functions(parse_tool_calls(as_string)) == [{"name": "f", "arguments": '{"x": 1}'}]
    missing = '<tool_call>{"name": "f"}</tool_call>'
    assert functions(parse_tool_calls(missing)) == [{"name": "f", "arguments": "{}"}]


def test_unicode_arguments_stay_readable() -> None:
    parsed = parse_tool_calls("Voilà " + block("météo", {"ville": "Zürich", "note": "晴れ ☀"}))
    [call] = functions(parsed)
    assert call["name"] == "météo"
    assert "Zürich" in call["arguments"] and "晴れ ☀" in call["arguments"]  # not \u-escaped
    assert json.loads(call["arguments"]) == {"ville": "Zürich", "note": "晴れ ☀"}
    assert parsed.content == "Voilà"


def test_an_answer_without_calls_is_left_alone() -> None:
    text = "  no <tools> here, not even <tool_call or </tool_call>\n"
    assert parse_tool_calls(text) == Parsed(content=text)


def test_forced_prefixes_are_read_as_the_start_of_the_block() -> None:
    required = forced_prefix("required")
    assert required == '<tool_call>\n{"name": "'
    text = 'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert functions(parse_tool_calls(required + text)) == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    named = forced_prefix(NamedToolChoice.model_validate(NAMED))
    assert named == '<tool_call>\n{"name": "get_weather", "arguments":'
    assert functions(parse_tool_calls(named + ' {"city": "Paris"}}\n</tool_call>')) == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert forced_prefix("auto") == forced_prefix("none") == forced_prefix(None) == ""


def test_finish_reason() -> None:
    assert finish_reason("stop", called=True) == "tool_calls"
    assert finish_reason("length", called=True) == "length"  # the client must see the cut
    assert finish_reason("stop", called=False) == "stop"


# ---- the same, streamed -----------------------------------------------------------------------

STREAMED = [
    block("get_weather", {"city": "Paris"}),
    "Checking.\n" + block("a", {"x": "<tool_call>"}) + "\n\n" + block("b", {}) + " done",
    "hi <tool_call>{bad}</tool_call> then " + block("ünï", {"k": "☀"}) + "\n<tool_ca",
    'text <tool <tool_call> <tool_call>{"name": "f"}',
    "plain text, no calls at all \n",
]


def streamed(pieces: list[str], prefix: str = "", names: list[str] | None = None) -> Parsed:
    reader = ToolCallStream(prefix, names)
    result = Parsed()
    for i, piece in enumerate(pieces):
        ready = reader.feed(piece, last=i == len(pieces) - 1)
        result = Parsed(result.content + ready.content, result.calls + ready.calls)
    assert result.calls == reader.calls
    return result


def same(a: Parsed, b: Parsed) -> bool:
    return a.content == b.content and functions(a) == functions(b)


@pytest.mark.parametrize("text", STREAMED)
def test_any_split_streams_the_same_calls_and_content(text: str) -> None:
    whole = parse_tool_calls(text)
    for cut in range(len(text) + 1):
        assert same(streamed([text[:cut], text[cut:]]), whole), cut
    assert same(streamed(list(text)), whole)  # one character at a time
    for size in (2, 3, 5, 7):
        assert same(streamed([text[i : i + size] for i in range(0, len(text), size)]), whole)


def test_streaming_holds_back_only_what_could_be_a_call() -> None:
    reader = ToolCallStream()
    assert reader.feed("Hello <tool") == Parsed(content="Hello")  # the space may precede a call
    assert reader.feed("box> and") == Parsed(content=" <toolbox> and")  # it was not one
    assert reader.feed(" more\n<tool_call>\n{") == Parsed(content=" more")
    ready = reader.feed('"name": "f"}\n</tool_call>')
    assert ready.content == "" and functions(ready) == [{"name": "f", "arguments": "{}"}]
    assert reader.feed("\n", last=True) == Parsed()


def test_a_forced_prefix_is_held_until_the_model_finishes_the_block() -> None:
    reader = ToolCallStream(forced_prefix("required"))
    assert reader.feed('get_weather", "arguments"') == Parsed()
    ready = reader.feed(': {"city": "Paris"}}', last=True)  # unclosed at the end: still a call
    assert functions(ready) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    failed = ToolCallStream(forced_prefix("required"))
    assert failed.feed("oops", last=True) == Parsed(content='<tool_call>\n{"name": "oops')


# ---- JSON fences (how Qwen2.5-Coder answers) --------------------------------------------------

# The default target's own answer to "What's the weather like in Paris today?" with three tools
# (greedy, through its chat template; EOS left out as the engine leaves it out of the text).
QWEN_FENCE = (
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n'
    '    "unit": "celsius"\n  }\n}\n```'
)
NAMES = ["get_weather", "search_web"]


def fence(body: str, language: str = "json") -> str:
    return f"```{language}\n{body}\n```"


def test_a_json_fence_calling_one_of_the_tools_is_a_call() -> None:
    parsed = parse_tool_calls(QWEN_FENCE, NAMES)
    assert parsed.content == ""
    assert functions(parsed) == [
        {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    ]
    call = '{"name": "search_web", "arguments": {"query": "mars"}}'
    for language in ("", "JSON", " json "):
        parsed = parse_tool_calls("Let me search.\n\n" + fence(call, language) + "\n", NAMES)
        assert parsed.content == "Let me search."
        assert functions(parsed) == [{"name": "search_web", "arguments": '{"query": "mars"}'}]


def test_a_fence_may_hold_a_list_of_calls() -> None:
    calls = '[{"name": "get_weather", "arguments": {}}, {"name": "search_web", "arguments": {}}]'
    parsed = parse_tool_calls(fence(calls), NAMES)
    assert [f["name"] for f in functions(parsed)] == ["get_weather", "search_web"]


@pytest.mark.parametrize(
    "text",
    [
        fence('{"name": "get_time", "arguments": {}}'),  # not one of the request's tools
        fence('{"name": "get_weather"}'),  # no arguments: a block would count it, a fence not
        fence('{"name": "my-app", "version": "1.0.0"}'),  # a package.json
        fence('[{"name": "get_weather", "arguments": {}}, {"name": "x", "arguments": {}}]'),
        fence("[]"),
        fence('{"name": "get_weather", "arguments": {"city": "Par'),  # not JSON
        fence('{"name": "get_weather", "arguments": {}}', "python"),  # not a JSON fence
        "```python\ndef f():\n    return 1\n```\nThat is all.",
    ],
)
def test_a_fence_that_is_no_call_of_the_tools_stays_content(text: str) -> None:
    assert parse_tool_calls(text, NAMES) == Parsed(content=text)


def test_a_block_may_wrap_its_call_in_a_fence() -> None:
    text = "<tool_call>\n" + QWEN_FENCE + "\n</tool_call>"
    for names in (None, NAMES):  # a block's call counts whatever its name, as ever
        assert functions(parse_tool_calls(text, names)) == [
            {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
        ]


def test_without_the_tools_names_fences_are_not_read() -> None:
    assert parse_tool_calls(QWEN_FENCE) == Parsed(content=QWEN_FENCE)


def test_one_call_ends_the_answer_at_its_first_call() -> None:
    calls = '[{"name": "get_weather", "arguments": {}}, {"name": "search_web", "arguments": {}}]'
    parsed = parse_tool_calls(fence(calls) + "\nmore", NAMES, one_call=True)
    assert parsed.content == "" and [f["name"] for f in functions(parsed)] == ["get_weather"]
    text = "Both:\n" + block("a", {}) + "\nand " + block("b", {}) + " done"
    parsed = parse_tool_calls(text, one_call=True)
    assert parsed.content == "Both:" and functions(parsed) == [{"name": "a", "arguments": "{}"}]


FENCED = [
    QWEN_FENCE,
    "Sure.\n" + QWEN_FENCE + "\n\n" + fence('[{"name": "search_web", "arguments": {}}]'),
    "Code:\n```python\nx = '```json'\n```\n```\n{\"a\": 1}\n```\n` `` done",
    # A fence ends at the first ``` even inside a string: no call then.
    "```json\n" + block("search_web", {"q": "```"})[len("<tool_call>") :],
    "``` \n" + '{"name": "search_web", "arguments": {}}',  # unclosed at the end: a call
]


@pytest.mark.parametrize("text", FENCED)
def test_any_split_streams_the_same_fenced_calls_and_content(text: str) -> None:
    whole = parse_tool_calls(text, NAMES)
    for cut in range(len(text) + 1):
        assert same(streamed([text[:cut], text[cut:]], names=NAMES), whole), cut
    assert same(streamed(list(text), names=NAMES), whole)


def test_a_code_fence_streams_at_once_and_a_json_one_waits_for_its_end() -> None:
    reader = ToolCallStream(names=NAMES)
    assert reader.feed("Here:\n``") == Parsed(content="Here:")
    assert reader.feed("`py") == Parsed(content="\n```py")  # no JSON fence: out at once
    assert reader.feed("thon\nx = 1\n```\n") == Parsed(content="thon\nx = 1")
    assert reader.feed("Next") == Parsed(content="\n```\nNext")  # opened nothing after all
    assert reader.feed(":\n```json\n") == Parsed(content=":")
    assert reader.feed('{"name": "search_web", ') == Parsed()  # may be a call: held
    ready = reader.feed('"arguments": {}}\n```', last=True)
    assert ready.content == "" and functions(ready) == [{"name": "search_web", "arguments": "{}"}]


# ---- request fields ---------------------------------------------------------------------------

REFUSED = [  # (body fields besides messages, the error's param, words its message contains)
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "without tools"),
    ({"tool_choice": "auto", "tools": []}, "tool_choice", "without tools"),
    ({"tool_choice": NAMED}, "tool_choice", "without tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "'required'"),
    ({"tools": [WEATHER], "tool_choice": "required", "add_generation_prompt": False},
     "tool_choice", "needs add_generation_prompt"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]},
     "tools.0.function.name", "at least 1 character"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "'function'"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, None,
     "tools and a structured output exclude each other"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "Field required"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "words"), REFUSED)
def test_bad_tool_fields_are_refused_before_the_engine(
    server: RunningServer, fields: dict, param: str, words: str
) -> None:
    assert_refused_before_engine(server, CHAT, {"messages": USER, **fields}, param, words)


def test_the_sdk_raises_for_an_unknown_named_tool(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        server.client().chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )


def test_text_response_format_and_parallel_tool_calls_are_accepted(server: RunningServer) -> None:
    plain = server.client().chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, **GREEDY
    )
    result = server.client().chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=4,
        response_format={"type": "text"},
        parallel_tool_calls=False,
        **GREEDY,
    )
    assert result.choices[0].message.content == plain.choices[0].message.content


# ---- the prompt -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_server() -> Iterator[RunningServer]:
    """A server whose template prints tools and the calls of the history."""
    with serve(make_engine(chat_template=TOOLS_TEMPLATE), max_queue=4) as running:
        yield running


def prompt_ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    ("tool_choice", "prefix"),
    [
        (None, ""),  # auto
        ("required", '<tool_call>\n{"name": "'),
        (NAMED, '<tool_call>\n{"name": "get_weather", "arguments":'),
    ],
)
def test_tools_and_the_forced_start_of_a_call_reach_the_model(
    tool_server: RunningServer, reference: Engine, tool_choice: Any, prefix: str
) -> None:
    choice = {} if tool_choice is None else {"tool_choice": tool_choice}
    result = tool_server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], max_tokens=6, **choice, **GREEDY
    )
    ids = prompt_ids(reference, f"{TOOLS_TEXT}<s>user: weather in Paris?<s>assistant:{prefix}")
    # The same ids (and, when forced, the call's grammar) give the same greedy answer: the
    # prompt was exactly this text.
    grammar = forced_grammar(
        tool_choice if tool_choice != NAMED else NamedToolChoice.model_validate(NAMED),
        [Tool.model_validate(WEATHER)],
    )
    expected = reference_run(
        reference, ids, max_tokens=6, temperature=0, ignore_eos=True, grammar=grammar
    )
    assert result.usage.prompt_tokens == len(ids)
    [answer] = result.choices
    # The tiny model writes no call unforced, and 6 tokens do not finish a forced one: the
    # answer, forced start included, comes back as content.
    assert answer.message.content == prefix + expected.text
    assert answer.message.tool_calls is None and answer.finish_reason == "length"
    if tool_choice is not None:
        assert expected.text != reference_run(reference, ids, max_tokens=6, **GREEDY_PARAMS).text


def test_tokenize_renders_the_tools_as_the_chat_route_does(
    tool_server: RunningServer, reference: Engine
) -> None:
    body = {"messages": USER, "tools": [WEATHER]}
    with tool_server.http() as http:
        tokens = http.post("/tokenize", json=body).json()["tokens"]
        without = http.post("/tokenize", json={"messages": USER}).json()["tokens"]
    assert tokens == prompt_ids(reference, f"{TOOLS_TEXT}<s>user: weather in Paris?<s>assistant:")
    assert len(without) < len(tokens)
    result = tool_server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], max_tokens=1, **GREEDY
    )
    assert result.usage.prompt_tokens == len(tokens)


CITY = {"type": "string", "enum": ["Paris", "Rome"]}
CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": CITY},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.mark.parametrize(
    "tool_choice", ["required", NAMED, {"type": "function", "function": {"name": "get_time"}}]
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_is_constrained_to_a_tool_and_its_parameters(
    server: RunningServer, tool_choice: Any, stream: bool
) -> None:
    """Even a random model answers a forced choice with a valid call, then stops (this
    server's template leaves the tools out, which keeps the prompt short)."""
    fields = {"tools": [CITY_TOOL, TIME_TOOL], "tool_choice": tool_choice, "max_tokens": 60}
    client = server.client()
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=USER, stream=True, **fields, **GREEDY
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [call for d in deltas for call in d.tool_calls or []]
        reason = chunks[-1].choices[0].finish_reason
    else:
        result = client.chat.completions.create(model=MODEL, messages=USER, **fields, **GREEDY)
        calls = result.choices[0].message.tool_calls or []
        reason = result.choices[0].finish_reason
    assert reason == "tool_calls" and len(calls) == 1
    [call] = calls
    arguments = json.loads(call.function.arguments)
    if isinstance(tool_choice, dict):
        assert call.function.name == tool_choice["function"]["name"]
    if call.function.name == "get_weather":
        assert set(arguments) == {"city"} and arguments["city"] in CITY["enum"]
    else:
        assert call.function.name == "get_time" and arguments == {}


def test_tool_choice_none_keeps_tools_out_of_the_prompt(
    tool_server: RunningServer, reference: Engine
) -> None:
    result = tool_server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none", max_tokens=6, **GREEDY
    )
    ids = prompt_ids(reference, "<s>user: weather in Paris?<s>assistant:")
    expected = reference_run(reference, ids, max_tokens=6, temperature=0, ignore_eos=True)
    assert result.usage.prompt_tokens == len(ids)
    assert result.choices[0].message.content == expected.text


def test_history_calls_reach_the_template_with_parsed_arguments(
    tool_server: RunningServer,
) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    with tool_server.http() as http:
        tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
        answer = http.post(CHAT, json={"messages": messages, "max_tokens": 1})
    assert text == (
        '<s>user: weather in Paris?<s>assistant: [get_weather {"city": "Paris"}]'
        "<s>tool: sunny(call_1)<s>assistant:"
    )
    assert answer.json()["usage"]["prompt_tokens"] == len(tokens)


# ---- the HTTP answer, with scripted model text ------------------------------------------------


class ScriptedStream:
    """Stands in for the engine's stream: plays fixed pieces of text for each choice, in turns."""

    def __init__(self, texts: list[list[str]], reason: str) -> None:
        self._items: list[tuple[int, RequestOutput]] = []
        for step in range(max(len(pieces) for pieces in texts)):
            for index, pieces in enumerate(texts):
                if step < len(pieces):
                    last = step == len(pieces) - 1
                    output = RequestOutput(
                        request_id=f"r{index}",
                        new_token_ids=[5],
                        new_text=pieces[step],
                        finished=last,
                        finish_reason=reason if last else None,
                        prompt_token_ids=[],
                        num_generated=step + 1,
                        stats=RequestStats(),
                    )
                    self._items.append((index, output))

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._items:
            raise StopAsyncIteration
        return self._items.pop(0)

    def close(self) -> None:
        pass


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Makes the chat route answer with the given text pieces instead of the model's."""

    def play(texts: list[list[str]], reason: str = "stop") -> None:
        monkeypatch.setattr(chat, "submit", lambda *_: ScriptedStream(texts, reason))

    return play


ANSWER = ["I'll look.\n<tool", '_call>\n{"name": "get_weather", "arguments": {"ci',
          'ty": "Paris"}}\n</tool', "_call>\n<tool_call>\n", '{"name": "get_time"}\n']  # fmt: skip


def test_a_call_comes_back_as_openai_tool_calls(server: RunningServer, script: Any) -> None:
    script([ANSWER])
    result = server.client().chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    [choice] = result.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I'll look."
    weather, clock = choice.message.tool_calls
    assert weather.type == "function" and weather.id.startswith("call_")
    assert weather.function.name == "get_weather"
    assert json.loads(weather.function.arguments) == {"city": "Paris"}
    # Not among the tools, still returned: checking names is the client's job, as with OpenAI.
    assert clock.function.name == "get_time" and clock.function.arguments == "{}"


def test_only_calls_give_null_content_and_a_cut_answer_stays_length(
    server: RunningServer, script: Any
) -> None:
    script([[block("get_weather", {"city": "Paris"})]], reason="length")
    result = server.client().chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    [choice] = result.choices
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    assert choice.finish_reason == "length"


def test_without_active_tools_the_text_is_not_read_for_calls(
    server: RunningServer, script: Any
) -> None:
    for fields in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        script([ANSWER])
        result = server.client().chat.completions.create(model=MODEL, messages=USER, **fields)
        [choice] = result.choices
        assert choice.message.content == "".join(ANSWER) and choice.message.tool_calls is None
        assert choice.finish_reason == "stop"


def test_a_forced_call_is_read_with_its_prefix(server: RunningServer, script: Any) -> None:
    script([[' {"city": "Paris"}}', "\n</tool_call>"]])
    result = server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], tool_choice=NAMED
    )
    [call] = result.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_calls_per_choice_match_the_whole_answer(
    server: RunningServer, script: Any
) -> None:
    plain = ["no calls ", "here <tool", "box>"]
    script([ANSWER, plain])
    whole = server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], n=2
    )
    script([ANSWER, plain])
    chunks = list(
        server.client().chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[WEATHER],
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content: dict[int, str] = {0: "", 1: ""}
    calls: dict[int, list[Any]] = {0: [], 1: []}
    reasons: dict[int, str] = {}
    for chunk in chunks[:-1]:
        [item] = chunk.choices
        content[item.index] += item.delta.content or ""
        calls[item.index] += item.delta.tool_calls or []
        if item.finish_reason:
            reasons[item.index] = item.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ANSWER) + len(plain)
    for choice in whole.choices:
        assert content[choice.index] == (choice.message.content or "")
        assert reasons[choice.index] == choice.finish_reason
    assert reasons == {0: "tool_calls", 1: "stop"}
    assert [c.index for c in calls[0]] == [0, 1] and calls[1] == []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls[0]] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls[0])


def test_the_default_models_fenced_call_comes_back_as_a_tool_call(
    server: RunningServer, script: Any
) -> None:
    pieces = [QWEN_FENCE[i : i + 6] for i in range(0, len(QWEN_FENCE), 6)]
    script([pieces])
    result = server.client().chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    [choice] = result.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    script([pieces])
    chunks = list(
        server.client().chat.completions.create(
            model=MODEL, messages=USER, tools=[WEATHER], stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == ""
    [streamed_call] = [call for d in deltas for call in d.tool_calls or []]
    assert streamed_call.function.name == "get_weather" and streamed_call.index == 0
    assert json.loads(streamed_call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_document_declares_tools_and_response_formats(server: RunningServer) -> None:
    with server.http() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    fields = schemas["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format"} <= set(fields)
    formats = schemas["ResponseFormat"]["properties"]["type"]["enum"]
    assert formats == ["text", "json_object", "json_schema"]
    message = schemas["AssistantMessage"]["properties"]
    assert {"type": "null"} in message["content"]["anyOf"]
    call = schemas["AssistantToolCall"]["properties"]
    assert set(call) == {"id", "type", "function"}


@pytest.mark.parametrize(
    ("fields", "ends_at_close"),
    [
        ({"parallel_tool_calls": False}, True),
        ({"parallel_tool_calls": True}, False),
        ({}, False),
        ({"parallel_tool_calls": False, "tool_choice": "required"}, False),  # one call anyway
        ({"parallel_tool_calls": False, "tool_choice": "none"}, False),  # nothing is read
    ],
)
def test_without_parallel_calls_the_answer_ends_at_the_first_call(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, fields: dict, ends_at_close: bool
) -> None:
    submitted: list[Any] = []
    # What the engine returns when the closing tag is a stop string: the block, unclosed.
    unclosed = block("get_weather", {"city": "Paris"})[: -len(CLOSE)]
    stopped = ScriptedStream([[unclosed[:15], unclosed[15:]]], "stop")

    def record(ctx: Any, subs: list[Any], arrival: float) -> ScriptedStream:
        submitted.extend(subs)
        return stopped

    monkeypatch.setattr(chat, "submit", record)
    result = server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], stop=["END"], **fields
    )
    [sub] = submitted
    assert sub.params.stop == (["END", CLOSE] if ends_at_close else ["END"])
    if fields.get("tool_choice") is None:
        [choice] = result.choices
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
