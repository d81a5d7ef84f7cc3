"""The SSE response on its own: plain separators, the send timeout, and disconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from server.sse import DONE, EventStream, encode_event


def test_events_end_with_a_plain_blank_line() -> None:
    assert encode_event({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'
    assert encode_event(DONE) == b"data: [DONE]\n\n"


async def _forever() -> dict:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _run(events: AsyncIterator[dict | str], send, receive) -> float:  # noqa: ANN001
    async def main() -> float:
        started = time.monotonic()
        await asyncio.wait_for(EventStream(events, send_timeout=0.2)({}, receive, send), 5)
        return time.monotonic() - started

    return asyncio.run(main())


def test_a_client_that_stops_reading_is_dropped() -> None:
    closed: list[bool] = []
    sent: list[dict] = []

    async def events() -> AsyncIterator[dict]:
        try:
            for i in range(1000):
                yield {"i": i}
        finally:
            closed.append(True)

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) > 3:  # the client's buffers are full: the write never completes
            await asyncio.Event().wait()

    assert _run(events(), send, _forever) < 2
    assert closed == [True]  # the generator's cleanup (which aborts the request) ran
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'data: {"i":0}\n\n'


def test_a_disconnect_stops_a_waiting_stream() -> None:
    closed: list[bool] = []

    async def events() -> AsyncIterator[dict]:
        try:
            yield {"n": 1}
            await asyncio.Event().wait()  # waiting for the next round, which never comes
            yield {"n": 2}
        finally:
            closed.append(True)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        while len(sent) < 2:
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    assert _run(events(), send, receive) < 2
    assert closed == [True]
    assert [m.get("body") for m in sent[1:]] == [b'data: {"n":1}\n\n']
