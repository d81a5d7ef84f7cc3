"""Request bodies of the OpenAI-compatible API, validated at the edge.

Unknown fields are ignored, because real clients send more than the spec. Known fields are strict
(``false`` is not an integer, ``"0.5"`` is not a number), and OpenAI parameters this server cannot
honour (``suffix``, ``best_of`` other than n) are refused rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.config import GrammarSpec

MAX_LOGPROBS = 20
_INT64 = 2**63

TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = list[TokenId]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
Seed = Annotated[StrictInt, Field(ge=-_INT64, le=_INT64 - 1)]
TopN = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
Bias = Annotated[StrictFloat, Field(ge=-100, le=100)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class PredictionPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Prediction(_Body):
    """OpenAI's predicted output: text the completion is expected to mostly repeat."""

    type: Literal["content"]
    content: StrictStr | list[PredictionPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class JsonSchemaFormat(_Body):
    name: StrictStr | None = None
    description: StrictStr | None = None
    # "schema" would shadow a BaseModel attribute: the wire name is an alias.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    """OpenAI's: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema: {name, schema}")
        return self


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: (
        Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None
    ) = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            name
            for name, value in (
                ("json", self.json_),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object or None),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of json, regex, choice, grammar, json_object"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def spec(self) -> GrammarSpec:
        if self.json_ is not None:
            schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return GrammarSpec("json_schema", schema)
        if self.regex is not None:
            return GrammarSpec("regex", self.regex)
        if self.choice is not None:
            return GrammarSpec("choice", json.dumps(self.choice))
        if self.grammar is not None:
            return GrammarSpec("grammar", self.grammar)
        return GrammarSpec("json_object")


class SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    model: StrictStr | None = None
    n: PositiveInt | None = None  # bounded by ServerConfig.max_n and the capacity
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # vLLM's extension
    min_p: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None  # vLLM's extension
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: TokenIds | None = None  # vLLM's extension
    ignore_eos: StrictBool | None = False  # vLLM's extension, sent by benchmark tools
    # Ours: where draft tokens come from for this request (output is the same either way).
    proposer: Literal["auto", "draft", "ngram"] | None = None
    # Ours: at most this many draft tokens per round for this request (0: no speculation); it
    # can lower the server's --gamma, never raise it.
    gamma: Annotated[StrictInt, Field(ge=0)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0, le=100)] | None = None  # vLLM's
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # vLLM's
    # Token ids as strings (JSON object keys), as OpenAI takes them.
    logit_bias: dict[str, Bias] | None = None
    # Drafts copied from it first (prompt lookup), verified like any other: same output.
    prediction: Prediction | None = None
    # Structured output, OpenAI's way or vLLM's (engine/grammar.py): at most one of the two.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_structured_output(self) -> SamplingFields:
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise ValueError("send response_format or structured_outputs, not both")
        return self

    @property
    def grammar(self) -> GrammarSpec | None:
        """What the output is constrained to, if anything."""
        if self.structured_outputs is not None:
            return self.structured_outputs.spec
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return GrammarSpec("json_object")
        assert fmt.json_schema is not None
        return GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema_))

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    # OpenAI's default; an explicit null means "as many as fit", as in vLLM.
    max_tokens: PositiveInt | None = 16
    echo: StrictBool | None = False
    logprobs: TopN | None = None
    suffix: StrictStr | None = None
    best_of: PositiveInt | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported by this server: omit it")
        if self.best_of not in (None, 1, self.choices_per_prompt):
            raise ValueError("best_of is not supported by this server: omit it or set it to n")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def max_tokens_explicit(self) -> bool:
        return "max_tokens" in self.model_fields_set and self.max_tokens is not None


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in ("text", "input_text") or self.text is None:
            raise ValueError(
                f"content part of type {self.type!r} is not supported: send text parts"
            )
        return self


class FunctionCall(_Body):
    name: StrictStr
    # OpenAI sends a JSON string; a few clients send the object itself.
    arguments: StrictStr | dict[str, Any]

    def for_template(self) -> dict[str, Any]:
        # Templates write the arguments with `| tojson` (Qwen2.5 does): a JSON string would come
        # out quoted, unlike the object the model was taught and answered with.
        arguments = self.arguments
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            # Anything but an object stays the client's string: rendered as sent, not refused,
            # since a model's own odd arguments may come back in the history.
            if isinstance(parsed, dict):
                arguments = parsed
        return {"name": self.name, "arguments": arguments}


class ToolCall(_Body):
    """A call an assistant message of the history made (OpenAI's ``tool_calls`` entries)."""

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        call = {"type": self.type, "function": self.function.for_template()}
        if self.id is not None:
            call["id"] = self.id
        return call


class ChatMessage(BaseModel):
    # Other extra keys pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part.text or "" for part in self.content)
        elif self.content is None:
            message["content"] = ""
        if self.tool_calls is not None:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        return message


class FunctionDefinition(_Body):
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema, passed to the template as is
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


def tools_for_template(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as the chat template reads them (None when there are none)."""
    return [tool.model_dump(exclude_none=True) for tool in tools] if tools else None


class FunctionName(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatTemplateFields(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_prompt_mode(self) -> ChatTemplateFields:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude each other")
        return self


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: TopN | None = None
    # Declared before tool_choice, whose validator reads them (pydantic validates in order).
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    # Accepted for compatibility: the model may answer with several calls either way.
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    # Field validators rather than a model validator, so the 400 names the field as its param.
    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_fits_tools(
        cls, value: str | NamedToolChoice | None, info: ValidationInfo
    ) -> str | NamedToolChoice | None:
        if value is None or value == "none" or "tools" not in info.data:
            return value  # when tools itself is invalid, that is the error to report
        names = [tool.function.name for tool in info.data["tools"] or []]
        if not names:
            raise ValueError("only 'none' works without tools: send tools or omit tool_choice")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(
                f"names function {value.function.name!r}, which is not among the tools "
                f"({', '.join(map(repr, names))})"
            )
        if value != "auto" and not info.data.get("add_generation_prompt"):
            # A forced call is written as the start of a new assistant turn.
            raise ValueError(
                "a required or named choice needs add_generation_prompt (and no "
                "continue_final_message)"
            )
        return value

    @model_validator(mode="after")
    def _tools_or_structured_output(self) -> ChatCompletionRequest:
        if self.tools_active and self.grammar is not None:
            # A call is the model's own format (<tool_call> blocks), not the requested one.
            raise ValueError(
                "tools and a structured output exclude each other: send tool_choice 'none' "
                "or drop response_format / structured_outputs"
            )
        return self

    @property
    def tools_active(self) -> bool:
        """Whether the tools reach the model and its answer is read for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or []]

    @property
    def one_tool_call(self) -> bool:
        """Whether the answer may call one tool at most (``parallel_tool_calls: false``)."""
        return self.tools_active and self.parallel_tool_calls is False

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return tools_for_template(self.tools) if self.tools_active else None

    @property
    def max_tokens_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None  # rendered by the chat template, as for a chat request
    return_token_strs: StrictBool | None = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        if self.tools and self.messages is None:
            raise ValueError("tools are rendered by the chat template: send them with messages")
        return self


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: TokenIds
