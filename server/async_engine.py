"""Drives the engine from its own thread and hands each round's tokens to asyncio.

Continuous batching falls out of the engine's design: ``add_request`` only queues, and every
``step`` admits queued requests into free slots before its round, so a new request joins the
running batch between rounds. The thread sleeps on an event while the engine has nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import SamplingParams
from engine.engine import Engine
from engine.request import RequestOutput
from server.metrics import RequestTiming, ServerMetrics

log = logging.getLogger("specserve.server")

_JOIN_TIMEOUT_S = 60.0


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


class EngineUnavailableError(Exception):
    """The engine is still warming up, shutting down, or its thread died."""


class EngineFailure(Exception):
    """The engine failed while running a request; that request is over."""


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams


class RequestStream:
    """The engine requests behind one HTTP request, read as one stream of (index, output)."""

    def __init__(self, core: AsyncEngine, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._core = core
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | EngineFailure] = asyncio.Queue()
        self._open = set(range(len(request_ids)))

    def put(self, item: tuple[int, RequestOutput] | EngineFailure) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._open:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, EngineFailure):
            self.close()
            raise item
        index, output = item
        if output.finished:
            self._open.discard(index)
        return index, output

    def close(self) -> None:
        """Aborts whatever has not finished: the client left or the handler bailed out."""
        for index in sorted(self._open):
            self._core.abort(self.request_ids[index])
        self._open.clear()


@dataclass
class _Tracked:
    stream: RequestStream
    index: int
    seq: int  # submission order, to tell which requests a failed step had taken in
    timing: RequestTiming


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.max_slots = engine.config.max_slots
        self.max_queue = max_queue
        self.metrics = metrics
        self.error: str | None = None
        self._tracked: dict[str, _Tracked] = {}  # touched only on the event loop
        self._lock = threading.Lock()  # orders submissions against the engine thread's steps
        self._seq = 0
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- state --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive and not self._stopping

    @property
    def capacity(self) -> int:
        """Engine requests the server holds at once: one per slot plus the waiting queue."""
        return self.max_slots + self.max_queue

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="specserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _JOIN_TIMEOUT_S)
        self._fail_all("the server is shutting down")

    # ---- requests (event loop) ----------------------------------------------------------------

    def submit(self, submissions: list[Submission], arrival: float) -> RequestStream:
        """Queues all engine requests of one HTTP request, or none of them.

        Raises EngineUnavailableError, QueueFullError, or ValueError (the engine's validation).
        """
        if not self.ready:
            raise EngineUnavailableError(self.error or "the server is still warming up")
        if self.num_in_flight + len(submissions) > self.capacity:
            raise QueueFullError()
        base = uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(submissions))]
        stream = RequestStream(self, ids)
        with self._lock:
            added: list[str] = []
            try:
                for request_id, sub in zip(ids, submissions, strict=True):
                    self.engine.add_request(sub.prompt_ids, sub.params, request_id=request_id)
                    added.append(request_id)
            except ValueError:
                for request_id in added:
                    self.engine.abort(request_id)
                raise
            self._seq += 1
            seq = self._seq
        for index, (request_id, sub) in enumerate(zip(ids, submissions, strict=True)):
            self._tracked[request_id] = _Tracked(stream, index, seq, RequestTiming(arrival))
            self.metrics.on_submit(len(sub.prompt_ids))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        # The request stays tracked (and counted against the queue bound) until the engine's
        # final "abort" output arrives, i.e. until its slot really is free.
        self.engine.abort(request_id)
        self._wake.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:  # failed earlier; this is the engine catching up
                continue
            self.metrics.on_output(tracked.timing, output, now)
            if output.finished:
                del self._tracked[output.request_id]
            tracked.stream.put((tracked.index, output))

    def _fail(self, request_id: str, message: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            self.metrics.on_error(tracked.timing, time.monotonic())
            tracked.stream.put(EngineFailure(message))

    def _fail_step(self, seq: int, running: set[str], waiting: set[str], message: str) -> None:
        for request_id, tracked in list(self._tracked.items()):
            # Running requests may have half-written KV; requests the step had taken in and that
            # are neither running nor waiting finished inside it, and their outputs were lost.
            # Requests submitted after the step began are still queued and unharmed.
            if request_id in running or (tracked.seq <= seq and request_id not in waiting):
                self._fail(request_id, message)

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._tracked):
            self._fail(request_id, message)

    # ---- engine thread ------------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us during shutdown
            self._loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        try:
            self._warm_up()
            self.engine.on_round = self.metrics.on_round
            self._ready.set()
            while not self._stopping:
                if not self.engine.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # noqa: BLE001 - whatever kills the loop must be reported
            self.error = f"the engine thread died: {type(exc).__name__}: {exc}"
            log.exception("engine thread died")
            self._post(self._fail_all, self.error)

    def _step(self) -> None:
        with self._lock:
            seq = self._seq
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            scheduler = self.engine.scheduler
            running = {r.request_id for r in scheduler.running.values()}
            waiting = {r.request_id for r in scheduler.waiting}
            for request_id in running:
                self.engine.abort(request_id)
            message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
            self._post(self._fail_step, seq, running, waiting, message)
            return
        if outputs:
            self._post(self._deliver, outputs)

    def _warm_up(self) -> None:
        """One greedy and one sampled request through every code path before reporting ready,
        so the first client does not pay for lazy initialisation."""
        started = time.perf_counter()
        engine = self.engine
        prompt = [1 + i % (engine.vocab_size - 1) for i in range(min(8, engine.max_len - 1))]
        # gamma + 1 tokens make the first round draft its full gamma.
        max_tokens = max(1, min(engine.gamma + 1, engine.max_len - len(prompt)))
        for temperature in (0.0, 1.0):
            params = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=0
            )
            engine.add_request(prompt, params, request_id=f"warmup-{temperature}")
        while engine.has_work() and not self._stopping:
            engine.step()
        log.info("warm-up done in %.2f s", time.perf_counter() - started)
