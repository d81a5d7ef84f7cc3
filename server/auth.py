"""Optional Bearer-key check on every /v1/* route, as plain ASGI middleware.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps ``receive`` and would hide a
client's disconnect from the streaming responses behind it.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, error_response


def _protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]):
            token = _bearer(scope)
            # compare_digest takes time independent of where the strings differ.
            if token is None or not hmac.compare_digest(token.encode("latin-1"), self._key):
                message = (
                    "missing API key: send it as 'Authorization: Bearer <key>'"
                    if token is None
                    else "invalid API key"
                )
                error = APIError(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
