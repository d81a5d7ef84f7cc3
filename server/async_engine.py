"""Drives the engine from its own thread and hands each round's tokens to asyncio.

Continuous batching falls out of the engine's design: ``add_request`` only queues, and every
``step`` admits queued requests into free slots before its round, so a new request joins the
running batch between rounds. The thread sleeps on an event while the engine has nothing to do.

Requests pass through a queue of ours on their way into the engine. That makes a failed round
recoverable: the engine thread takes back the requests of that round, replays them one at a time
and alone (new ones wait meanwhile), and so fails only the request that breaks a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import SamplingParams
from engine.engine import Engine
from engine.request import RequestOutput, RequestStats
from server.metrics import RequestTiming, ServerMetrics
from server.replay import ReplayCursor, ReplayDivergedError

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
    # The seed of a request whose caller set none, fixed so that a replay samples alike.
    seed: int | None = None


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

    def rekey(self, index: int, request_id: str) -> bool:
        """Points choice ``index`` at its replay; False when that choice is no longer wanted."""
        if index not in self._open:
            return False
        self.request_ids[index] = request_id
        return True

    def close(self) -> None:
        """Aborts whatever has not finished: the client left or the handler bailed out."""
        for index in sorted(self._open):
            self._core.abort(self.request_ids[index])
        self._open.clear()


def _aborted(request_id: str) -> RequestOutput:
    """The final output of a request aborted before it reached the engine."""
    return RequestOutput(request_id, [], "", True, "abort", [], 0, RequestStats())


@dataclass
class _Tracked:
    stream: RequestStream
    index: int
    timing: RequestTiming
    cursor: ReplayCursor = field(default_factory=ReplayCursor)


@dataclass
class _Job:
    """An engine request as the engine thread feeds it: a replay gets a fresh id, because the
    engine would match an abort of the old id against the new request."""

    request_id: str
    submission: Submission
    attempt: int = 0

    def retry(self) -> _Job:
        base = self.request_id.partition("~")[0]
        return _Job(f"{base}~{self.attempt + 1}", self.submission, self.attempt + 1)


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.max_slots = engine.config.max_slots
        self.max_queue = max_queue
        self.metrics = metrics
        self.error: str | None = None
        self._tracked: dict[str, _Tracked] = {}  # touched only on the event loop
        # Requests wait here rather than in the engine, so that after a failed round the engine
        # can be given one suspect at a time. Shared with the engine thread under the lock.
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._suspects: deque[_Job] = deque()  # from a failed round, to be replayed alone
        self._in_engine: dict[str, _Job] = {}
        self._isolating = False
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.waiting.set_function(lambda: self.num_waiting)

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

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not yet in a slot, in the engine's queue or in ours."""
        return self.engine.num_waiting + len(self._pending) + len(self._suspects)

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

        Raises EngineUnavailableError or QueueFullError.
        """
        if not self.ready:
            raise EngineUnavailableError(self.error or "the server is still warming up")
        if self.num_in_flight + len(submissions) > self.capacity:
            raise QueueFullError()
        base = uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(submissions))]
        stream = RequestStream(self, ids)
        jobs = []
        for index, (request_id, sub) in enumerate(zip(ids, submissions, strict=True)):
            self._tracked[request_id] = _Tracked(stream, index, RequestTiming(arrival))
            self.metrics.on_submit(len(sub.prompt_ids))
            # A fixed seed makes an unseeded request replayable after a failed round; it stays
            # out of params, which would make the request a coupled one (engine.add_request).
            if sub.params.seed is None and sub.seed is None:
                sub = replace(sub, seed=secrets.randbits(62))
            jobs.append(_Job(request_id, sub))
        with self._lock:
            self._pending.extend(jobs)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            queued = self._unqueue(request_id)
            if not queued:
                # The request stays tracked (and counted against the queue bound) until the
                # engine's final "abort" output arrives, i.e. until its slot really is free.
                self.engine.abort(request_id)
        if queued:
            self._deliver([_aborted(request_id)])
        self._wake.set()

    def _unqueue(self, request_id: str) -> bool:
        for queue in (self._pending, self._suspects):
            for job in queue:
                if job.request_id == request_id:
                    queue.remove(job)
                    return True
        return False

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:  # failed or replayed earlier; this is the engine catching up
                continue
            try:
                output = tracked.cursor.trim(output)
            except ReplayDivergedError as exc:
                self.abort(output.request_id)
                self._fail(output.request_id, str(exc))
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

    def _after_failed_step(self, failed: list[str], moved: dict[str, str], message: str) -> None:
        for request_id in failed:
            self._fail(request_id, message)
        for old, new in moved.items():
            tracked = self._tracked.pop(old, None)
            if tracked is None:  # finished or failed meanwhile
                self.abort(new)
                continue
            tracked.cursor.restart()
            self._tracked[new] = tracked
            self.metrics.replayed.inc()
            if not tracked.stream.rekey(tracked.index, new):  # its client left meanwhile
                self.abort(new)

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
                self._feed()
                if not self.engine.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # noqa: BLE001 - whatever kills the loop must be reported
            self.error = f"the engine thread died: {type(exc).__name__}: {exc}"
            log.exception("engine thread died")
            self._post(self._fail_all, self.error)

    def _feed(self) -> None:
        """Moves queued requests into the engine: one suspect at a time, alone, while a failed
        round is being sorted out; otherwise all of them (the engine admits in order)."""
        with self._lock:
            if self._isolating and not self._in_engine:
                if self._suspects:
                    self._add(self._suspects.popleft())
                else:
                    self._isolating = False
            if self._isolating:
                return
            while self._pending:
                self._add(self._pending.popleft())

    def _add(self, job: _Job) -> None:
        sub = job.submission
        try:
            self.engine.add_request(
                sub.prompt_ids, sub.params, request_id=job.request_id, seed=sub.seed
            )
        except ValueError as exc:  # prompts.py checks all of this first; a guard, not a path
            self._post(self._fail, job.request_id, f"the engine refused the request: {exc}")
            return
        self._in_engine[job.request_id] = job

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self._isolate(exc)
            return
        with self._lock:
            for output in outputs:
                if output.finished:
                    self._in_engine.pop(output.request_id, None)
        if outputs:
            self._post(self._deliver, outputs)

    def _isolate(self, exc: Exception) -> None:
        """After a failed step: a request that was alone in it is the culprit and fails; when
        several were, each is replayed alone from scratch, and whichever fails again alone is
        the culprit. Requests that were only waiting go back to the queue untouched."""
        waiting = {r.request_id for r in self.engine.scheduler.waiting}
        message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
        moved: dict[str, str] = {}
        with self._lock:
            jobs = list(self._in_engine.values())
            self._in_engine.clear()
            involved = [job.request_id for job in jobs if job.request_id not in waiting]
            failed = involved if len(involved) == 1 else []
            requeued = []
            for job in jobs:
                self.engine.abort(job.request_id)
                if job.request_id in failed:
                    continue
                again = job.retry()
                moved[job.request_id] = again.request_id
                if job.request_id in waiting:
                    requeued.append(again)
                else:
                    self._suspects.append(again)
                    self._isolating = True
            self._pending.extendleft(reversed(requeued))
        self._post(self._after_failed_step, failed, moved, message)

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
