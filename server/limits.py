"""Request limits: the body size (an ASGI middleware, so an oversized body is refused while it is
read, before JSON parsing), and the parameters whose bounds depend on the configuration."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.context import ServerConfig
from server.errors import APIError, bad_request, error_response
from server.protocol import SamplingFields


def check_limits(body: SamplingFields, config: ServerConfig) -> None:
    """400 for the bounds the protocol models cannot know: they come from ServerConfig."""
    if body.choices_per_prompt > config.max_n:
        raise bad_request(f"n must be at most {config.max_n}", param="n")
    stops = body.stop or []
    if len(stops) > config.max_stop:
        raise bad_request(f"stop takes at most {config.max_stop} strings", param="stop")
    if any(len(s) > config.max_stop_chars for s in stops):
        raise bad_request(
            f"stop strings must be at most {config.max_stop_chars} characters", param="stop"
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413.

    A declared Content-Length over the limit is refused at once; a chunked body is buffered up
    to the limit, then replayed to the app, whose later ``receive`` calls reach the client again
    (the streaming responses watch them for a disconnect).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left while sending; let the app see the disconnect as usual.
                chunks_message: Message = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                chunks_message = {"type": "http.request", "body": b"".join(chunks)}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return chunks_message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
        )
        await error_response(error)(scope, receive, send)
