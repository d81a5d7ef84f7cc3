"""Server-sent events for streamed completions.

Written here rather than taken from sse-starlette because three details matter for clients and
slots: events end with a plain ``\\n\\n`` (some clients break on ``\\r\\n``), a client that stops
reading is dropped after a send timeout, and a disconnect is noticed while the stream is waiting
for the next round (not only at the next write), so its request is aborted at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("specserve.server")

DONE = "[DONE]"


def encode_event(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class EventStream(StreamingResponse):
    """Streams ``data:`` events; the iterator yields JSON-ready dicts, or ``DONE``."""

    def __init__(self, events: AsyncIterator[dict | str], send_timeout: float) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.events = events
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._cancel_on_disconnect, receive, group.cancel_scope)
                await self._stream(send)
                group.cancel_scope.cancel()
        finally:
            # The generator's own cleanup aborts unfinished engine requests; run it even when
            # cancelled, and shielded so the cancellation cannot skip it.
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def _cancel_on_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _stream(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for event in self.events:
            message = {"type": "http.response.body", "body": encode_event(event), "more_body": True}
            try:
                with anyio.fail_after(self.send_timeout):
                    await send(message)
            except TimeoutError:
                # The connection is left unfinished on purpose: the client is gone or stuck.
                log.warning(
                    "client stopped reading for %.0f s; dropping its stream", self.send_timeout
                )
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
