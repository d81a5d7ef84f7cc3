"""``python -m loadtest {run,compare,hf,report,soak}``; a bare ``python -m loadtest --base-url ...``
means ``run``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from loadtest.arguments import (
    add_load_arguments,
    add_prompt_arguments,
    default_out,
    load_settings,
    select_prompts,
    settings_record,
    speedup_pair,
)
from loadtest.measure import measure_server
from loadtest.output import machine_info, write_report
from loadtest.results import Report, SystemResult
from loadtest.systems import ALL_SYSTEMS, HF_SYSTEMS

COMMANDS = ("run", "compare", "hf", "report", "soak")


def cmd_run(args: argparse.Namespace) -> int:
    prompts = select_prompts(args)
    machine = machine_info()
    result = asyncio.run(
        measure_server(args.name, args.base_url, prompts, load_settings(args, args.model))
    )
    report = Report(settings_record(args, prompts), machine, [result], args.speedup or [])
    write_report(report, args.out or default_out())
    return 0 if all(lv.ok for lv in result.levels) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from loadtest.compare import run_compare

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = run_compare(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_report(report, args.out)
    if report.settings.get("interrupted"):
        return 130
    return 0 if all(s.error is None for s in report.systems) else 1


def cmd_hf(args: argparse.Namespace) -> int:
    from engine.loader import load_pair
    from loadtest.hf_batch1 import measure_hf

    systems = args.systems.split(",")
    target, draft = load_pair(args.target, args.draft, device=args.device, progress=False)
    prompts = select_prompts(args)
    results = measure_hf(
        systems, target, draft, prompts, args.max_tokens, args.temperature, args.warmup,
        args.duration,
    )  # fmt: skip
    args.out.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Merges reports from separate runs (say ours here, a peer elsewhere) into one."""
    reports = [Report.load(path) for path in args.inputs]
    systems: list[SystemResult] = []
    for path, report in zip(args.inputs, reports, strict=True):
        for system in report.systems:
            if any(s.name == system.name for s in systems):
                system.name = f"{system.name}@{path.parent.name or path.stem}"
            systems.append(system)
    pairs = args.speedup or [p for r in reports for p in r.speedups]
    settings = {"merged": [str(p) for p in args.inputs]}
    settings |= {"sources": {str(p): r.settings for p, r in zip(args.inputs, reports, strict=True)}}
    write_report(Report(settings, reports[0].machine, systems, pairs), args.out or default_out())
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from loadtest.client import RequestOptions
    from loadtest.soak import render, run_soak, write_soak

    options = RequestOptions(
        endpoint=args.endpoint,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    result = asyncio.run(
        run_soak(
            args.base_url, select_prompts(args), options, seconds=args.minutes * 60,
            concurrency=args.concurrency, sample_every=args.sample_every, pid=args.pid,
            api_key=args.api_key, warmup=args.warmup, max_rss_growth_pct=args.max_rss_growth,
        )
    )  # fmt: skip
    written = write_soak(result, args.out or default_out())
    print(render(result))
    print("[loadtest] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0 if result.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="load-test one OpenAI-compatible server")
    run.add_argument("--base-url", required=True, help="http://host:port (or .../v1)")
    run.add_argument("--model", help="model name in requests (default: first of /v1/models)")
    run.add_argument("--name", default="server", help="the system's name in the report")
    add_load_arguments(run)
    run.set_defaults(func=cmd_run)

    compare = commands.add_parser("compare", help="start systems in turn and compare them")
    compare.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}"
    )
    compare.add_argument("--target", help="target model for every stack (default pair's)")
    compare.add_argument("--draft", help="draft model (ours and hf-assisted)")
    compare.add_argument("--serve-args", default="", help="extra `specserve serve` arguments")
    compare.add_argument("--peer-args", default="", help="extra `transformers serve` arguments")
    compare.add_argument("--peer-model", type=Path, help="model dir for transformers serve")
    compare.add_argument("--hf-device", default="auto", help="device of the HF baselines")
    compare.add_argument("--start-timeout", type=float, default=900.0, help="seconds to ready")
    compare.add_argument("--hf-timeout", type=float, default=3600.0, help="HF baselines, s")
    add_load_arguments(compare)
    compare.set_defaults(func=cmd_compare)

    hf = commands.add_parser("hf", help="HF generate baselines at batch 1 (JSON out)")
    hf.add_argument("--systems", default=",".join(HF_SYSTEMS))
    hf.add_argument("--target")
    hf.add_argument("--draft")
    hf.add_argument("--device", default="auto")
    hf.add_argument("--out", type=Path, required=True, help="JSON file")
    hf.add_argument("--duration", type=float, help="no new prompt after S seconds")
    add_prompt_arguments(hf)
    hf.set_defaults(func=cmd_hf)

    report = commands.add_parser("report", help="merge report.json files into one report")
    report.add_argument("inputs", type=Path, nargs="+")
    report.add_argument("--out", type=Path)
    report.add_argument("--speedup", type=speedup_pair, action="append")
    report.set_defaults(func=cmd_report)

    soak = commands.add_parser("soak", help="N minutes at one concurrency, watching for leaks")
    soak.add_argument("--base-url", required=True, help="http://host:port (or .../v1)")
    soak.add_argument("--model", help="model name in requests (default: first of /v1/models)")
    soak.add_argument("--minutes", type=float, required=True)
    soak.add_argument("--concurrency", type=int, default=8)
    soak.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    soak.add_argument("--pid", type=int, help="server PID for RSS (default: /metrics process_*)")
    soak.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    soak.add_argument("--api-key")
    soak.add_argument(
        "--max-rss-growth", type=float, help="fail when RSS grows more than this many percent"
    )
    soak.add_argument("--out", type=Path, help="output dir (out/loadtest-*)")
    add_prompt_arguments(soak)
    soak.set_defaults(func=cmd_soak)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # The default SIGTERM handler skips finally blocks and would orphan the started systems.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = build_parser().parse_args(argv)
    if args.command == "compare" and args.out is None:
        args.out = default_out()
    return int(args.func(args))
