"""Command-line options shared by the commands, and what they turn into."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from loadtest.client import RequestOptions
from loadtest.generator import Level
from loadtest.measure import LoadSettings
from loadtest.prompts import DEFAULT_PROMPTS, Prompt, load_prompts

DEFAULT_SWEEP = [1, 2, 4, 8, 16, 32]


def default_out() -> Path:
    return Path("out") / time.strftime("loadtest-%Y%m%d-%H%M%S")


def speedup_pair(text: str) -> tuple[str, str]:
    system, sep, baseline = text.partition(":")
    if not sep or not system or not baseline:
        raise argparse.ArgumentTypeError(f"expected SYSTEM:BASELINE, got {text!r}")
    return system, baseline


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="Spec-Bench JSONL")
    group.add_argument("--per-task", type=int, help="first K prompts of each task")
    group.add_argument("--limit", type=int, help="first N prompts (tasks interleaved)")
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--warmup", type=int, default=2, help="uncounted requests first")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_arguments(parser)
    group = parser.add_argument_group("load")
    group.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    shape = group.add_mutually_exclusive_group()
    shape.add_argument(
        "--concurrency", type=int, nargs="+", help=f"levels (default sweep {DEFAULT_SWEEP})"
    )
    shape.add_argument("--rate", type=float, nargs="+", help="Poisson arrivals, requests/s")
    group.add_argument("--max-concurrency", type=int, help="in-flight cap in --rate mode")
    group.add_argument(
        "--num-requests", type=int, help="per level (default: every prompt, at least 2 waves)"
    )
    group.add_argument("--duration", type=float, help="per level: no new request after S seconds")
    group.add_argument("--request-timeout", type=float, default=600.0)
    group.add_argument("--seed", type=int, default=0, help="for Poisson arrivals")
    group.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into bodies")
    group.add_argument("--api-key")
    group.add_argument("--out", type=Path, default=None, help="output dir (out/loadtest-*)")
    group.add_argument(
        "--speedup", type=speedup_pair, action="append", help="SYSTEM:BASELINE (repeatable)"
    )


def select_prompts(args: argparse.Namespace) -> list[Prompt]:
    return load_prompts(args.prompts, args.per_task, args.limit)


def load_settings(args: argparse.Namespace, model: str | None = None) -> LoadSettings:
    if args.rate:
        levels = [Level(rate=r, max_concurrency=args.max_concurrency) for r in args.rate]
    else:
        levels = [Level(concurrency=c) for c in args.concurrency or DEFAULT_SWEEP]
    options = RequestOptions(
        endpoint=args.endpoint,
        model=model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        extra_body=args.extra_body,
    )
    return LoadSettings(
        levels=levels,
        options=options,
        num_requests=args.num_requests,
        duration_s=args.duration,
        warmup=args.warmup,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        api_key=args.api_key,
    )


def settings_record(args: argparse.Namespace, prompts: list[Prompt]) -> dict[str, Any]:
    """The arguments as they go into the report, secrets left out."""
    record = {k: v for k, v in vars(args).items() if k not in ("api_key", "func", "command")}
    record = {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}
    return record | {"num_prompts": len(prompts)}
