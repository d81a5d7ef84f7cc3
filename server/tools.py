"""Model text to OpenAI tool calls, for models that answer in the "hermes" format (Qwen2.5's).

Such a model calls a function by writing a block, possibly several, possibly after some text::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Every block whose JSON is an object with a ``name`` becomes a call; everything else, including a
block whose JSON does not parse, stays content: no call is ever invented. Whitespace next to a
call's block is dropped from the content (it only separated the blocks). A block ends at the
first ``</tool_call>``, even one inside a JSON string. Names are not checked against the
request's tools: a client that wants that checks them, as it must with OpenAI.

A forced ``tool_choice`` (``"required"`` or a named function) writes the start of a block into
the prompt (``forced_prefix``) and constrains the rest (``forced_grammar``): a tool's name, then
arguments valid for its ``parameters`` schema, then the closing brace, after which the answer
ends. With ``"auto"`` nothing is constrained: the model chooses whether and how to call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.config import GrammarSpec
from server.protocol import NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class Parsed:
    """Content and calls read from some model text (for a stream: what became ready)."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


def forced_prefix(tool_choice: str | NamedToolChoice | None) -> str:
    """The start of the assistant's answer that makes it call a tool (any, or the named one).

    The named form stops after the colon, without JSON's usual space: tokenizers attach that
    space to the next token (`` {"``), so a prompt ending in a bare space would start the model
    on a token it rarely saw.
    """
    if tool_choice == "required":
        return f'{OPEN}\n{{"name": "'
    if isinstance(tool_choice, NamedToolChoice):
        name = json.dumps(tool_choice.function.name, ensure_ascii=False)
        return f'{OPEN}\n{{"name": {name}, "arguments":'
    return ""


# A call's arguments as Qwen's template and json.dumps write them: one space after ":" and ",".
_ARGUMENT_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def forced_grammar(
    tool_choice: str | NamedToolChoice | None, tools: list[Tool]
) -> GrammarSpec | None:
    """What may follow ``forced_prefix``: (with "required") one of the tools' names and the
    arguments key, then arguments valid for that tool's parameters, then the closing brace. A
    Lark grammar for llguidance, whose ``%json`` embeds a JSON schema."""
    if tool_choice == "required":
        chosen, named = tools, False
    elif isinstance(tool_choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == tool_choice.function.name]
        named = True
    else:
        return None
    rules = []
    for index, tool in enumerate(chosen):
        # The prefix opened the name's string ("required") or wrote up to "arguments": (named).
        head = "" if named else json.dumps(json.dumps(tool.function.name)[1:] + ', "arguments":')
        schema = dict(tool.function.parameters or {"type": "object"})
        schema["x-guidance"] = _ARGUMENT_LAYOUT
        rules.append(f'call_{index}: {head} " "? args_{index} "}}"')
        rules.append(f"args_{index}: %json {json.dumps(schema)}")
    start = "start: " + " | ".join(f"call_{index}" for index in range(len(chosen)))
    return GrammarSpec("grammar", "\n".join([start, *rules]))


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` for an answer that ended after calling; a cut one stays
    ``length`` so the client knows the answer is incomplete."""
    return "tool_calls" if called and reason == "stop" else reason


def _call(block: str) -> dict[str, Any] | None:
    """The OpenAI tool call a block's JSON describes, or None when it describes none."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    name, arguments = data.get("name"), data.get("arguments", {})
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):  # already a JSON string is fine; a number is not
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of an opening tag."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """Reads one choice's text as it arrives: content goes out as soon as it cannot be part of
    a block, each call once its block closes (or the text ends).

    Held back meanwhile: a possible start of ``<tool_call>``, an open block, and trailing
    whitespace (dropped if a call follows). Fed in any pieces, the result is the same.
    """

    def __init__(self, prefix: str = "") -> None:
        self.calls: list[dict[str, Any]] = []  # every call so far, in order
        self._pending = ""  # text not yet settled: a partial tag, or a block from its tag on
        self._in_block = False
        self._space = ""  # content's trailing whitespace, kept back in case a call follows
        self._after_call = False  # so the whitespace right after a call is dropped
        self._ready = Parsed()
        self._advance(prefix)  # the forced start of a block; it goes out with the first feed

    def feed(self, text: str, last: bool = False) -> Parsed:
        """What became ready with ``text``; with ``last``, everything held back is settled."""
        self._advance(text)
        if last:
            self._settle()
        return self._take()

    def _take(self) -> Parsed:
        ready, self._ready = self._ready, Parsed()
        return ready

    def _advance(self, text: str) -> None:
        self._pending += text
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE, len(OPEN))
                if end < 0:
                    return
                if not self._close_block(self._pending[len(OPEN) : end]):
                    self._content(self._pending[: end + len(CLOSE)])
                self._pending, self._in_block = self._pending[end + len(CLOSE) :], False
            else:
                start = self._pending.find(OPEN)
                if start < 0:
                    split = len(self._pending) - _partial_open(self._pending)
                    self._content(self._pending[:split])
                    self._pending = self._pending[split:]
                    return
                self._content(self._pending[:start])
                self._pending, self._in_block = self._pending[start:], True

    def _settle(self) -> None:
        # An unclosed last block counts if its JSON parses; the whitespace was not before a call.
        if not (self._in_block and self._close_block(self._pending[len(OPEN) :])):
            self._content(self._pending)
        self._ready.content += self._space
        self._pending, self._in_block, self._space = "", False, ""

    def _close_block(self, block: str) -> bool:
        call = _call(block)
        if call is None:
            return False
        self.calls.append(call)
        self._ready.calls.append(call)
        self._space, self._after_call = "", True
        return True

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept) :]
        self._ready.content += kept


def parse_tool_calls(text: str) -> Parsed:
    """The whole answer at once: the same split a stream of it gives."""
    return ToolCallStream().feed(text, last=True)
