"""Concurrency sweep on a synthetic pair of the real shapes (no weights needed).

    python -m engine.synthetic_bench                          # 1.5B/0.5B shapes, c = 1..32
    python -m engine.synthetic_bench --agreement 0.7 --concurrency 1 8
    python -m engine.synthetic_bench --shapes tiny            # seconds, any CPU

For a lent GPU, where the real weights cannot travel (see engine/synthetic.py): target-only vs
speculative decoding per concurrency level, both engines as ``specserve serve`` builds them
(adaptive gamma, prompt lookup, draft window), with the draft/target agreement set by hand. Per
level it prints tokens/s, speedup, acceptance, tokens per row and round, the round time and the
share of round time outside model kernels (CPU: host time outside model forwards, which run
synchronously; CUDA: GPU idle time inside rounds, from a profiled rerun's kernel timeline).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

from engine.config import CLI_DRAFT_WINDOW, EngineConfig, SamplingParams, default_draft_head
from engine.engine import Engine
from engine.loader import resolve_device, resolve_dtype
from engine.synthetic import SHAPES, random_prompts, synthetic_pair

ROUND_LABEL = "specserve.round"


@dataclass
class LevelResult:
    concurrency: int
    tokens: int
    seconds: float
    ttft_p50: float
    rounds: int
    row_rounds: int
    drafted: int
    accepted: int
    round_seconds: float  # host wall time inside the engine's rounds
    kernel_seconds: float | None  # model-kernel time inside those rounds (None: not measured)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def outside_kernels(self) -> float | None:
        if self.kernel_seconds is None or not self.round_seconds:
            return None
        return max(0.0, 1.0 - self.kernel_seconds / self.round_seconds)


class RoundTimer:
    """Host time of the engine's rounds and of the model forwards run inside them. On CPU a
    forward returns when its kernels are done, so the difference is the time outside them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.round_seconds = 0.0
        self.forward_seconds = 0.0
        self._in_round = False
        self._runners = [engine.target]
        if engine.proposer is not None:
            self._runners.append(engine.proposer.runner)

    @contextmanager
    def attached(self) -> Iterator[RoundTimer]:
        # Instance attributes shadow the methods, also for the engine's own self._round calls.
        self.engine._round = self._timed_round(self.engine._round)  # type: ignore[method-assign]
        for runner in self._runners:
            runner.forward = self._timed_forward(runner.forward)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del self.engine._round
            for runner in self._runners:
                del runner.forward

    def _timed_round(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self._in_round = True
            try:
                with torch.profiler.record_function(ROUND_LABEL):
                    return original(*args, **kwargs)
            finally:
                self._in_round = False
                self.round_seconds += time.perf_counter() - started

        return timed

    def _timed_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self._in_round:
                    self.forward_seconds += time.perf_counter() - started

        return timed


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as disjoint, sorted intervals."""
    union: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def covered(windows: list[tuple[float, float]], busy: list[tuple[float, float]]) -> float:
    """How much of the windows (disjoint) the busy intervals cover, counting overlaps once."""
    busy = merged(busy)
    total = 0.0
    for window_start, window_end in windows:
        for start, end in busy:
            total += max(0.0, min(end, window_end) - max(start, window_start))
    return total


def device_kernel_seconds(events: list[Any]) -> tuple[float, int]:
    """GPU kernel (and copy) time inside the labelled rounds of a profile, and the number of
    rounds. Kineto puts host and device events on one timeline (microseconds); the device-side
    copies of our labels span idle gaps, so they are left out."""
    rounds = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.name == ROUND_LABEL and e.device_type == DeviceType.CPU
    ]
    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation and e.name != ROUND_LABEL
    ]
    return covered(merged(rounds), kernels) / 1e6, len(rounds)


def run_level(engine: Engine, prompts: list[list[int]], max_tokens: int) -> LevelResult:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    before = replace(engine.stats)
    timer = RoundTimer(engine)
    with timer.attached():
        started = time.perf_counter()
        results = engine.generate(prompts, params)
        seconds = time.perf_counter() - started
    after = engine.stats
    ttfts = sorted(
        r.stats.first_token_time - r.stats.arrival_time
        for r in results
        if r.stats.first_token_time is not None
    )
    return LevelResult(
        concurrency=len(prompts),
        tokens=sum(len(r.token_ids) for r in results),
        seconds=seconds,
        ttft_p50=ttfts[len(ttfts) // 2] if ttfts else 0.0,
        rounds=after.rounds - before.rounds,
        row_rounds=after.row_rounds - before.row_rounds,
        drafted=after.drafted - before.drafted,
        accepted=after.accepted - before.accepted,
        round_seconds=timer.round_seconds,
        kernel_seconds=timer.forward_seconds if engine.target.device.type == "cpu" else None,
    )


def profile_kernels(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float | None:
    """Seconds of GPU kernels per round, from a profiled rerun of the level (None on CPU)."""
    if engine.target.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    timer = RoundTimer(engine)  # only for its round labels
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof, timer.attached():
        engine.generate(prompts, params)
    seconds, rounds = device_kernel_seconds(list(prof.events()))
    return seconds / rounds if rounds else None


def measure(
    engine: Engine, prompts: list[list[int]], max_tokens: int, profile: bool
) -> LevelResult:
    if engine.target.graphs is not None:
        # CUDA graphs are captured on a shape's first use: not what a level should time.
        engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    result = run_level(engine, prompts, max_tokens)
    if profile and result.rounds:
        per_round = profile_kernels(engine, prompts, max_tokens)
        if per_round is not None:
            result.kernel_seconds = per_round * result.rounds
    return result


def table(levels: list[tuple[LevelResult, LevelResult]]) -> str:
    header = [
        "concurrency", "target-only tok/s", "spec tok/s", "speedup", "acceptance",
        "tokens/row/round", "spec round ms", "outside kernels (target-only)",
        "outside kernels (spec)", "TTFT p50 spec s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    for baseline, spec in levels:
        speedup = spec.tokens_per_second / baseline.tokens_per_second
        acceptance = f"{spec.accepted / spec.drafted:.0%}" if spec.drafted else "-"
        per_row = (spec.accepted + spec.row_rounds) / spec.row_rounds if spec.row_rounds else 0
        round_ms = spec.round_seconds / spec.rounds * 1000 if spec.rounds else 0
        cells = [
            str(spec.concurrency), f"{baseline.tokens_per_second:.1f}",
            f"{spec.tokens_per_second:.1f}", f"{speedup:.2f}x", acceptance, f"{per_row:.2f}",
            f"{round_ms:.1f}", share(baseline.outside_kernels), share(spec.outside_kernels),
            f"{spec.ttft_p50:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.synthetic_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    parser.add_argument(
        "--agreement",
        type=float,
        default=0.85,
        help="share of tokens on which the draft's greedy token is the target's (0.85: about "
        "the real pair's on Spec-Bench)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=6)
    parser.add_argument("--prompt-lookup", type=int, default=3, help="0 = off")
    parser.add_argument("--draft-window", type=int, default=CLI_DRAFT_WINDOW)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, rerun each level under the profiler for the GPU idle share",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, replay decode, draft and verify forwards from CUDA graphs",
    )
    parser.add_argument("--out", type=Path, default=Path("synthetic_bench.json"))
    args = parser.parse_args(argv)
    if not 0.0 <= args.agreement <= 1.0:
        parser.error(f"--agreement must be in [0, 1], got {args.agreement}")
    if min(args.concurrency) < 1 or args.prompt_tokens < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --prompt-tokens and --max-tokens must be positive")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    max_len = args.prompt_tokens + args.max_tokens + 8
    started = time.perf_counter()
    pair = synthetic_pair(args.shapes, args.agreement, dtype, device, max_len, args.seed)
    print(f"built the pair in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    baseline_config = EngineConfig(
        gamma=0,
        max_slots=max(args.concurrency),
        max_len=max_len,
        prefix_cache=False,  # every level's prompts are new; a repeat must not skip prefill
        tune_prompt_gemm=True,
        cuda_graphs=args.cuda_graphs,
    )
    spec_config = replace(
        baseline_config,
        gamma=args.gamma,
        adaptive_gamma=True,
        prompt_lookup=args.prompt_lookup,
        draft_window=args.draft_window,
        draft_head=default_draft_head(args.draft_window),
    )
    started = time.perf_counter()
    baseline = Engine(pair.target, None, baseline_config)
    spec = Engine(pair.target, pair.draft, spec_config)
    print(f"engines ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    vocab = pair.target.config.vocab_size
    for engine in (baseline, spec):  # first calls pay one-off allocation and kernel choice
        engine.generate(random_prompts(1, 16, vocab, seed=99), SamplingParams(8, 0))

    levels = []
    for concurrency in args.concurrency:
        prompts = random_prompts(concurrency, args.prompt_tokens, vocab, args.seed + concurrency)
        base = measure(baseline, prompts, args.max_tokens, args.profile)
        fast = measure(spec, prompts, args.max_tokens, args.profile)
        levels.append((base, fast))
        print(
            f"c={concurrency}: target-only {base.tokens_per_second:.1f}, "
            f"spec {fast.tokens_per_second:.1f} tok/s",
            file=sys.stderr,
            flush=True,
        )

    report = table(levels)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    machine = (
        f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} CPU "
        f"threads, {gpu}, torch {torch.__version__}, {dtype}"
    )
    print(report)
    print(
        f"\nsynthetic {args.shapes} pair, agreement {args.agreement}, prompts of "
        f"{args.prompt_tokens} random tokens, greedy, {args.max_tokens} new tokens, "
        f"gamma<={args.gamma} adaptive, CUDA graphs {'on' if args.cuda_graphs else 'off'}; "
        f"machine: {machine}"
    )
    args.out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args) | {"out": str(args.out)},
                "levels": [
                    {"target_only": asdict(base), "spec": asdict(fast)} for base, fast in levels
                ],
                "table": report,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
