"""The OpenAPI document: response shapes, every error status a route can answer, and the limits
of this server's configuration, so a client (or a fuzzer) can trust the document.

The routes build their JSON by hand (streams and non-streams share the code), so the response
models here only describe; FastAPI never validates responses against them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from server.context import ServerContext
from server.protocol import MAX_LOGPROBS


class _Open(BaseModel):
    # Responses may grow fields; clients must ignore the ones they do not know.
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class CompletionResponse(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    metrics: dict[str, Any] | None = None


class CalledFunction(_Open):
    name: str
    arguments: str  # JSON, as the model wrote it: validate it before use


class AssistantToolCall(_Open):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None  # null only when the message calls tools
    tool_calls: list[AssistantToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: dict[str, Any] | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int
    speculative_decoding: dict[str, Any]


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Open):
    prompt: str


class ProbeStatus(_Open):
    status: str
    error: str | None = None


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Invalid request: malformed JSON, a bad field, or a limit exceeded", {}),
    401: ("Missing or wrong API key (only with --api-key)", {}),
    404: ("The model is not served here", {}),
    413: ("The request body is over the size limit", {}),
    429: ("Every slot and queue place is taken", _RETRY_AFTER),
    500: ("The engine failed while running the request", {}),
    503: ("The engine is warming up, shutting down, or dead", _RETRY_AFTER),
}
# Before OpenAPI 3.2's itemSchema, the schema of an event stream describes one event.
_EVENT_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "with stream=true: one event per chunk, then `data: [DONE]`",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "a chunk in the JSON shape of the response, an OpenAI error "
                    "object if the engine failed mid-stream, or [DONE]",
                },
            },
        }
    }
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries in OpenAI's error envelope for ``statuses``."""
    return {
        status: {"model": ErrorResponse, "description": text, "headers": headers}
        for status in statuses
        for text, headers in [_ERRORS[status]]
    }


def generation(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A completion route: JSON, or an event stream, or any error a generation can end in."""
    ok = {"model": model, "description": "The completion", "content": _EVENT_STREAM}
    return {200: ok, **errors(400, 401, 404, 413, 429, 500, 503)}


# ---- the document -----------------------------------------------------------------------------


def _update(node: Any, matches: Callable[[dict[str, Any]], bool], **keywords: Any) -> None:
    """Adds ``keywords`` to every sub-schema of ``node`` that ``matches``."""
    if isinstance(node, dict):
        if matches(node):
            node.update(keywords)
        for value in node.values():
            _update(value, matches, **keywords)
    elif isinstance(node, list):
        for value in node:
            _update(value, matches, **keywords)


def _is(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda node: node.get("type") == kind


def _token_list(node: dict[str, Any]) -> bool:
    return node.get("type") == "array" and node.get("items", {}).get("type") == "integer"


def _declare_limits(schemas: dict[str, Any], ctx: ServerContext) -> None:
    """Writes the bounds the server enforces outside the pydantic models into the document."""
    engine, config = ctx.engine, ctx.config
    top_token = engine.vocab_size - 1
    most_tokens = engine.max_len - 1
    most_n = min(config.max_n, ctx.core.capacity)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _update(props[field], _is("integer"), maximum=most_tokens)
        _update(props["n"], _is("integer"), maximum=most_n)
        _update(props["logprobs"], _is("integer"), maximum=MAX_LOGPROBS)
        _update(props["stop"], _is("string"), minLength=1, maxLength=config.max_stop_chars)
        _update(props["stop"], _is("array"), maxItems=config.max_stop)
        _update(props["stop_token_ids"], _is("integer"), maximum=top_token)
        _update(props["logit_bias"], _is("object"), propertyNames={"pattern": "^[0-9]+$"})
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    _update(prompt, _is("integer"), maximum=top_token)
    _update(prompt, _is("string"), minLength=1)
    _update(prompt, _is("array"), minItems=1)
    _update(prompt, _token_list, maxItems=most_tokens)
    _update(schemas["CompletionRequest"]["properties"]["suffix"], _is("string"), maxLength=0)
    _update(schemas["DetokenizeRequest"]["properties"]["tokens"], _is("integer"), maximum=top_token)


def _drop_422(document: dict[str, Any]) -> None:
    # Validation errors are answered 400 (server/errors.py), as OpenAI does, never 422.
    for path in document.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        document.get("components", {}).get("schemas", {}).pop(name, None)


def _declare_auth(document: dict[str, Any]) -> None:
    """With --api-key, every /v1/* route needs the Bearer key (server/auth.py)."""
    components = document.setdefault("components", {})
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document.get("paths", {}).items():
        if path == "/v1" or path.startswith("/v1/"):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]


def install_openapi(app: FastAPI, ctx: ServerContext) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _drop_422(document)
            _declare_limits(document["components"]["schemas"], ctx)
            if ctx.config.api_key:
                _declare_auth(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
