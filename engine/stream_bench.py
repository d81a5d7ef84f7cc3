"""Streams at a fixed concurrency, engine level (no HTTP): how long each stream waits between
its tokens while other prompts are prefilled, and how long a new prompt waits for its first.

    python -m engine.stream_bench --concurrency 4 --per-task 2
    python -m engine.stream_bench --concurrency 4 --per-task 2 --prefill-chunk-seconds 0

A closed loop over Spec-Bench chat prompts (greedy, ``--max-tokens`` new tokens each, EOS
ignored): a finished stream's place goes to the next prompt. Model flags are the server's.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.bench import DEFAULT_PROMPTS, chat_ids, load_prompts
from engine.config import SamplingParams
from engine.engine import Engine


@dataclass
class StreamReport:
    tokens: int = 0
    seconds: float = 0.0
    # Seconds between one output of a stream and its next, per output (a stall is one entry,
    # however many tokens then arrive at once).
    stalls: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)  # seconds from arrival, per request

    def summary(self) -> dict[str, float | int]:
        stalls = sorted(self.stalls)

        def quantile(q: float) -> float:
            return stalls[min(len(stalls) - 1, int(q * len(stalls)))] if stalls else 0.0

        return {
            "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "stall_p50_ms": round(quantile(0.5) * 1e3),
            "stall_p99_ms": round(quantile(0.99) * 1e3),
            "stall_max_ms": round(stalls[-1] * 1e3) if stalls else 0,
            "ttft_mean_s": round(sum(self.first_token) / max(1, len(self.first_token)), 2),
            "ttft_max_s": round(max(self.first_token, default=0.0), 2),
        }


def run_streams(
    engine: Engine, prompts: list[list[int]], params: SamplingParams, concurrency: int
) -> StreamReport:
    """Keeps ``concurrency`` requests in the engine until every prompt has finished."""
    report = StreamReport()
    pending = list(prompts)
    arrived: dict[str, float] = {}
    last_output: dict[str, float] = {}
    live = 0
    started = time.perf_counter()
    while pending or live:
        while pending and live < concurrency:
            request_id = engine.add_request(pending.pop(0), params)
            arrived[request_id] = time.perf_counter()
            live += 1
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.new_token_ids:
                report.tokens += len(output.new_token_ids)
                previous = last_output.get(output.request_id)
                if previous is None:
                    report.first_token.append(now - arrived[output.request_id])
                else:
                    report.stalls.append(now - previous)
                last_output[output.request_id] = now
            if output.finished:
                live -= 1
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    from server.cli import add_model_arguments, build_engine

    parser = argparse.ArgumentParser(prog="python -m engine.stream_bench", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--per-task", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    engine, target, _ = build_engine(args)
    prompts = [chat_ids(target, text) for _, text in load_prompts(args.prompts, args.per_task)]
    # One short request first, so no stream pays for the first forwards' warm-up.
    engine.generate([chat_ids(target, "Say hi.")], SamplingParams(max_tokens=8, temperature=0))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    report = run_streams(engine, prompts, params, args.concurrency)
    config = engine.config
    summary = {
        "concurrency": args.concurrency,
        "requests": len(prompts),
        "gamma": engine.gamma,
        "prefill_chunk": config.prefill_chunk,
        "prefill_chunk_seconds": config.prefill_chunk_seconds,
    }
    print(json.dumps(summary | report.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
