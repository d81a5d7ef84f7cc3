"""Shared by the robustness tests: server gauges, and every error the server logs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest

from engine.engine import Engine
from tests.server.conftest import RunningServer, make_engine

QUEUE_GAUGES = (
    "specserve:num_requests_waiting",
    "specserve:num_requests_running",
    "specserve:kv_slots_used",
)


def queue_gauges(running: RunningServer) -> dict[str, float]:
    metrics = running.metrics()
    return {name: metrics[(name, ())] for name in QUEUE_GAUGES}


def drained(running: RunningServer) -> bool:
    """Nothing running, waiting or holding a slot, as /metrics and the front both see it."""
    return not any(queue_gauges(running).values()) and running.context.core.num_in_flight == 0


@contextlib.contextmanager
def hear_uvicorn(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Makes caplog hear uvicorn too, whose loggers do not propagate (an exception inside the
    ASGI app is logged on uvicorn.error). Enter it after the server started: uvicorn's logging
    set-up replaces the handlers of its loggers."""
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("specserve", "uvicorn"))
    ]


@pytest.fixture(scope="session")
def reference() -> Engine:
    """The served weights driven by no server: isolated, unbatched outputs to compare with."""
    return make_engine()
