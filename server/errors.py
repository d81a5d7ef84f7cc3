"""OpenAI-shaped error responses: every failure a client sees has the same JSON envelope."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("specserve.server")

# The `type` strings OpenAI uses, by status; clients switch on these, not on our messages.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    error_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# Fields that accept several shapes; pydantic reports one error per shape, which reads as noise.
_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried: "str", "list[int]", "function-after[...]", a class.
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper()
    )


def _split(loc: tuple[Any, ...]) -> tuple[str, bool]:
    """The field path a client would write ("messages.0.content"), and whether the error is about
    one member of a union."""
    path, in_union = [], False
    for part in loc:
        if part == "body":
            continue
        if _is_union_tag(part):
            in_union = True
            continue
        path.append(str(part))
    return ".".join(path), in_union


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', 'cannot parse it')}", None
        if e.get("loc") == ("body",) and e.get("type") in ("model_attributes_type", "dict_type"):
            return "the request body must be a JSON object", None
    specific: dict[str, str] = {}
    shapes: dict[str, str] = {}
    for e in errors:
        where, in_union = _split(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if in_union and str(e.get("type", "")).endswith("_type"):
            # A wrong shape for one member of a union says little; name the accepted shapes.
            parts = where.split(".")
            named = [i for i, part in enumerate(parts) if part in _SHAPES]
            if named:
                where = ".".join(parts[: named[-1] + 1])
                msg = f"must be {_SHAPES[parts[named[-1]]]}"
            shapes.setdefault(where, msg)
        else:
            specific.setdefault(where, msg)
    for where, msg in shapes.items():
        if not any(k == where or k.startswith(where + ".") for k in specific):
            specific[where] = msg
    messages = [f"{where}: {msg}" if where else msg for where, msg in specific.items()]
    return "; ".join(messages[:5]), next(iter(specific), None) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))
