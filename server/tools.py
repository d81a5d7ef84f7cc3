"""Model text to OpenAI tool calls, for models that answer in the "hermes" format (Qwen2.5's).

Such a model calls a function by writing a block, possibly several, possibly after some text::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Every block whose JSON is an object with a ``name`` becomes a call; everything else, including a
block whose JSON does not parse, stays content: no call is ever invented. Whitespace next to a
call's block is dropped from the content (it only separated the blocks). A block ends at the
first ``</tool_call>``, even one inside a JSON string; its JSON may sit in a Markdown fence
(```` ```json ````). Names are not checked against the request's tools: a client that wants
that checks them, as it must with OpenAI.

Qwen2.5-Coder, the default pair, ignores its template's instruction and answers a tool request
with a Markdown JSON fence instead (five probes of five that called, greedy)::

    ```json
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ```

A coder model writes fences for other reasons too, so a fence (with no language or ``json``)
counts only when its JSON is a call of one of the request's tools, with its arguments, or a
list of such calls; any other fence stays content. A fence whose body does not start like
JSON streams on as content at once; one that does is held until it closes.

A forced ``tool_choice`` (``"required"`` or a named function) writes the start of a block into
the prompt (``forced_prefix``) and constrains the rest (``forced_grammar``): a tool's name, then
arguments valid for its ``parameters`` schema, then the closing brace, after which the answer
ends. With ``"auto"`` nothing is constrained: the model chooses whether and how to call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.config import GrammarSpec
from server.protocol import NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FENCE = "```"
# A fence that may hold a call: no language or JSON's, then the line's end.
_FENCE_HEAD = r"```[ \t]*(?:json)?[ \t]*\r?\n"
FENCE_OPEN = re.compile(_FENCE_HEAD, re.IGNORECASE)
# A whole block that is such a fence, for its body.
FENCED_BODY = re.compile(rf"\s*{_FENCE_HEAD}(.*)```\s*", re.IGNORECASE | re.DOTALL)
# The end of some text that may still become such a fence.
PARTIAL_FENCE = re.compile(r"`{1,3}$|```[ \t]*(?:j(?:s(?:on?)?)?)?[ \t]*\r?$", re.IGNORECASE)


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


def _call(data: Any, names: frozenset[str] | None) -> dict[str, Any] | None:
    """The OpenAI tool call a block's parsed JSON describes, or None when it describes none.
    With ``names`` (a fenced block), only a call of one of them, arguments given, counts."""
    if not isinstance(data, dict):
        return None
    name, arguments = data.get("name"), data.get("arguments", {})
    if not isinstance(name, str) or not name:
        return None
    if names is not None and (name not in names or "arguments" not in data):
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


def _calls(block: str, names: frozenset[str] | None) -> list[dict[str, Any]]:
    """The calls in a block: one object, or (fenced) a list of them, all calls; else none.
    A ``<tool_call>`` block may wrap its JSON in a fence too."""
    inner = FENCED_BODY.fullmatch(block) if names is None else None
    try:
        data = json.loads(inner.group(1) if inner else block)
    except ValueError:
        return []
    if names is not None and isinstance(data, list) and data:
        calls = [_call(item, names) for item in data]
        return [c for c in calls if c is not None] if all(calls) else []
    call = _call(data, names)
    return [call] if call is not None else []


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of an opening tag."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


@dataclass
class _Block:
    """An opened block: its body starts ``body`` characters into the pending text."""

    body: int
    close: str
    fenced: bool


class ToolCallStream:
    """Reads one choice's text as it arrives: content goes out as soon as it cannot be part of
    a call, each call once its block closes (or the text ends).

    Held back meanwhile: a possible start of ``<tool_call>`` (or, with ``names``, of a JSON
    fence), an open block, and trailing whitespace (dropped if a call follows). Fed in any
    pieces, the result is the same. With ``one_call``, the answer ends at its first call.
    """

    def __init__(
        self, prefix: str = "", names: list[str] | None = None, one_call: bool = False
    ) -> None:
        self.calls: list[dict[str, Any]] = []  # every call so far, in order
        self._names = frozenset(names) if names else None
        self._one_call = one_call
        self._pending = ""  # text not yet settled: a partial opening, or a block from it on
        self._block: _Block | None = None
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

    @property
    def _ended(self) -> bool:
        return self._one_call and bool(self.calls)

    def _advance(self, text: str) -> None:
        self._pending += text
        while not self._ended:
            block = self._block
            if block is not None:
                body = self._pending[block.body :]
                if block.fenced and (start := body.lstrip()) and start[0] not in "{[":
                    # A code block, not a call: it streams as content from here on.
                    self._content(self._pending[: block.body])
                    self._pending, self._block = body, None
                    continue
                end = body.find(block.close)
                if end < 0:
                    return
                end += block.body
                if not self._close_block(self._pending[block.body : end], block.fenced):
                    self._content(self._pending[: end + len(block.close)])
                self._pending, self._block = self._pending[end + len(block.close) :], None
            else:
                found = self._opening()
                if found is None:
                    split = len(self._pending) - self._partial_opening()
                    self._content(self._pending[:split])
                    self._pending = self._pending[split:]
                    return
                start, block = found
                self._content(self._pending[:start])
                self._pending, self._block = self._pending[start:], block

    def _opening(self) -> tuple[int, _Block] | None:
        """Where the first block opens in the pending text, and the block."""
        found = None
        tag = self._pending.find(OPEN)
        if tag >= 0:
            found = (tag, _Block(len(OPEN), CLOSE, fenced=False))
        fence = FENCE_OPEN.search(self._pending) if self._names else None
        if fence is not None and (found is None or fence.start() < found[0]):
            found = (fence.start(), _Block(fence.end() - fence.start(), FENCE, fenced=True))
        return found

    def _partial_opening(self) -> int:
        held = _partial_open(self._pending)
        if self._names:
            fence = PARTIAL_FENCE.search(self._pending)
            if fence is not None:
                held = max(held, len(self._pending) - fence.start())
        return held

    def _settle(self) -> None:
        # An unclosed last block counts if its JSON parses; the whitespace was not before a call.
        block = self._block
        if not self._ended:
            if not (
                block is not None and self._close_block(self._pending[block.body :], block.fenced)
            ):
                self._content(self._pending)
            self._ready.content += self._space  # "" after a call
        self._pending, self._block, self._space = "", None, ""

    def _close_block(self, block: str, fenced: bool) -> bool:
        calls = _calls(block, self._names if fenced else None)
        if not calls:
            return False
        if self._one_call:
            calls = calls[:1]
        self.calls += calls
        self._ready.calls += calls
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


def parse_tool_calls(text: str, names: list[str] | None = None, one_call: bool = False) -> Parsed:
    """The whole answer at once: the same split a stream of it gives."""
    return ToolCallStream(names=names, one_call=one_call).feed(text, last=True)
