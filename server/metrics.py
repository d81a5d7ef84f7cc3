"""Prometheus metrics, named after vLLM's with the ``specserve:`` prefix.

Each app owns a registry, so several servers in one process (tests) never share counters.
Per-round speculation metrics come from the engine thread through ``Engine.on_round``; per-request
latencies from the asyncio side, as outputs are handed to their HTTP requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from engine.engine import Engine
from engine.request import RequestOutput
from engine.stats import RoundRecord

PREFIX = "specserve:"
FINISH_REASONS = ("stop", "length", "abort", "error")

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
                120.0, 240.0, 480.0)  # fmt: skip


def _batch_buckets(max_slots: int) -> list[float]:
    if max_slots <= 16:
        return [float(b) for b in range(1, max_slots + 1)]
    powers = [float(2**i) for i in range(max_slots.bit_length()) if 2**i < max_slots]
    return powers + [float(max_slots)]


@dataclass
class RequestTiming:
    """Latency bookkeeping of one engine request, on the asyncio side."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # process_resident_memory_bytes and friends (Linux): what a soak test watches for leaks.
        ProcessCollector(registry=reg)
        gamma = engine.gamma

        def name(suffix: str) -> str:
            return PREFIX + suffix

        self.requests = Counter(
            name("request_success"), "Finished requests by finish reason.",
            ["finished_reason"], registry=reg,
        )  # fmt: skip
        for reason in FINISH_REASONS:
            self.requests.labels(finished_reason=reason)
        self.rejected = Counter(
            name("request_rejected"), "Requests refused before reaching the engine.", ["reason"],
            registry=reg,
        )  # fmt: skip
        self.replayed = Counter(
            name("request_replayed"),
            "Requests restarted from scratch after a failed round they were in.", registry=reg,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            name("prompt_tokens"), "Prompt tokens of admitted requests.", registry=reg
        )
        self.prompt_tokens_cached = Counter(
            name("prompt_tokens_cached"),
            "Prompt tokens whose K/V a request found in its slot (prefix cache).", registry=reg,
        )  # fmt: skip
        self.generation_tokens = Counter(
            name("generation_tokens"), "Generated tokens handed to clients.", registry=reg
        )
        self.num_drafts = Counter(
            name("spec_decode_num_drafts"), "Row-rounds that drafted at least one token.",
            registry=reg,
        )  # fmt: skip
        self.num_draft_tokens = Counter(
            name("spec_decode_num_draft_tokens"), "Draft tokens proposed.", registry=reg
        )
        self.num_accepted_tokens = Counter(
            name("spec_decode_num_accepted_tokens"), "Draft tokens the target accepted.",
            registry=reg,
        )  # fmt: skip
        per_pos = Counter(
            name("spec_decode_num_accepted_tokens_per_pos"),
            "Drafts whose token at this position (0-based) was accepted.", ["position"],
            registry=reg,
        )  # fmt: skip
        self._accepted_at = [per_pos.labels(position=str(i)) for i in range(gamma)]

        slots = engine.config.max_slots
        Gauge(name("num_requests_running"), "Requests in a KV slot.", registry=reg).set_function(
            lambda: engine.num_running
        )
        # The server's front (server/async_engine.py) points this at its own queue too.
        self.waiting = Gauge(
            name("num_requests_waiting"), "Requests admitted but waiting for a slot.", registry=reg
        )
        self.waiting.set_function(lambda: engine.num_waiting)
        Gauge(name("kv_slots_used"), "KV slots in use.", registry=reg).set_function(
            lambda: slots - engine.scheduler.num_free_slots
        )
        Gauge(name("kv_slots_capacity"), "KV slots.", registry=reg).set(slots)
        self.gamma = Gauge(
            name("spec_decode_gamma"), "Draft tokens per round (gamma).", registry=reg
        )
        self.gamma.set(gamma)

        self.ttft = Histogram(
            name("time_to_first_token_seconds"), "Arrival to first generated token.",
            buckets=_TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            name("inter_token_latency_seconds"),
            "Gap per generated token after the first (a round's tokens share its gap).",
            buckets=_ITL_BUCKETS, registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            name("e2e_request_latency_seconds"), "Arrival to finish.", buckets=_E2E_BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.accepted_per_round = Histogram(
            name("spec_decode_accepted_tokens_per_round"),
            "Draft tokens accepted per row-round that drafted.",
            buckets=[float(i) for i in range(gamma + 1)] or [0.0], registry=reg,
        )  # fmt: skip
        self.batch_size = Histogram(
            name("batch_size_per_round"), "Requests in each speculative round.",
            buckets=_batch_buckets(slots), registry=reg,
        )  # fmt: skip

    # ---- engine thread ------------------------------------------------------------------------

    def on_round(self, record: RoundRecord) -> None:
        self.batch_size.observe(record.batch_size)
        for drafted, accepted in zip(record.drafted, record.accepted, strict=True):
            if drafted == 0:
                continue
            self.num_drafts.inc()
            self.num_draft_tokens.inc(drafted)
            self.num_accepted_tokens.inc(accepted)
            self.accepted_per_round.observe(accepted)
            for counter in self._accepted_at[:accepted]:
                counter.inc()

    # ---- asyncio side -------------------------------------------------------------------------

    def on_submit(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def on_output(self, timing: RequestTiming, output: RequestOutput, now: float) -> None:
        count = len(output.new_token_ids)
        if count:
            self.generation_tokens.inc(count)
            if timing.first_token is None:
                timing.first_token = now
                self.ttft.observe(now - timing.arrival)
                self.prompt_tokens_cached.inc(output.stats.cached_tokens)
                gap = 0.0  # the first round's extra tokens reach the client with the first
                count -= 1
            else:
                assert timing.last_token is not None
                gap = (now - timing.last_token) / count
            for _ in range(count):
                self.itl.observe(gap)
            timing.last_token = now
        if output.finished:
            self.requests.labels(finished_reason=output.finish_reason or "stop").inc()
            self.e2e.observe(now - timing.arrival)

    def on_error(self, timing: RequestTiming, now: float) -> None:
        self.requests.labels(finished_reason="error").inc()
        self.e2e.observe(now - timing.arrival)
